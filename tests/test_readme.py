"""The README's promises that can be checked mechanically."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run

README = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()


def test_flag_table_matches_the_script():
    table = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "flag_table.py")],
                           capture_output=True, text=True, check=True).stdout
    block = re.search(r"<!-- flags:start -->\n(.*)<!-- flags:end -->", README, re.S).group(1)
    assert block == table, "README flag table is stale: regenerate it with python scripts/flag_table.py"


def test_ci_runs_the_readme_test_command():
    command = "bash scripts/setup_env.sh && .venv/bin/python -m pytest tests"
    assert command in README
    assert command in open(os.path.join(REPO_ROOT, ".ci", "run")).read()


def test_layout_table_names_every_module_and_only_paths_that_exist():
    section = README.split("## Layout\n")[1].split("\n### ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for row in rows:
        path = re.match(r"\| `([^`]+)`", row).group(1)
        assert os.path.exists(os.path.join(REPO_ROOT, path)), f"the Layout table names {path}, which does not exist"
        if path.endswith("/"):  # a folder's row names its modules: each must exist in it
            for name in re.findall(r"`([\w.]+\.(?:py|sh))`", row):
                assert os.path.exists(os.path.join(REPO_ROOT, path, name)), f"{path}{name} does not exist"
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "aria_utils")):
        package = os.path.relpath(folder, REPO_ROOT).replace(os.sep, "/")
        for name in names:
            if not name.endswith(".py") or name == "__init__.py" and os.path.getsize(os.path.join(folder, name)) == 0:
                continue
            listed = any(row.startswith(f"| `{package}/{name}`") for row in rows) or any(
                row.startswith(f"| `{package}/`") and f"`{name}`" in row for row in rows)
            assert listed, f"{package}/{name} is missing from the README's Layout table"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_demo_command_runs_end_to_end(tmp_path, family, assets):
    """README command 1, shortened (and its --sdxl form): every stage runs offline and the student pipeline
    loads and generates."""
    output = tmp_path / "demo"
    # Fewer and shorter teacher generations than the demo's 256 x 10 steps, one timed run in the speed report:
    # every stage still runs. The region index of the built-in corpus comes from the session's cache (its corpus
    # is the same) instead of being embedded again.
    result = run(["bash", os.path.join(REPO_ROOT, "examples", "demo.sh"), *(["--sdxl"] if family == "sdxl" else []),
                  str(output), "--max_train_steps", "6", "--validation_steps", "3", "--checkpointing_steps", "3",
                  "--region_cache_dir", assets["region_cache"], "--speed_report_repeats", "1"],
                 env={"ARIA_DEMO_NUM_PROMPTS": "64", "ARIA_DEMO_INFERENCE_STEPS": "2"})
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert f"{pipeline} student at {output / 'student'} loads and generates" in result.stdout
    assert (output / "student" / "aria_regions.json").is_file()
    assert (output / "student" / "demo_sample.png").is_file()
    assert (output / "student" / "validation" / "step-6.png").is_file()
    assert "speed" in json.load(open(output / "student" / "train_summary.json"))
    assert f"Results: {output / 'student'}/README.md" in result.stdout
