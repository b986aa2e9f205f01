"""The README's promises that can be checked mechanically."""

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


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_demo_command_runs_end_to_end(tmp_path, family):
    """README command 1, shortened (and its --sdxl form): every stage runs offline and the student pipeline
    loads and generates."""
    output = tmp_path / "demo"
    # Fewer and shorter teacher generations than the demo's 256 x 10 steps: every stage still runs.
    result = run(["bash", os.path.join(REPO_ROOT, "examples", "demo.sh"), *(["--sdxl"] if family == "sdxl" else []),
                  str(output), "--max_train_steps", "6", "--validation_steps", "3", "--checkpointing_steps", "3"],
                 env={"ARIA_DEMO_NUM_PROMPTS": "64", "ARIA_DEMO_INFERENCE_STEPS": "2"})
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert f"{pipeline} student at {output / 'student'} loads and generates" in result.stdout
    assert (output / "student" / "aria_regions.json").is_file()
    assert (output / "student" / "demo_sample.png").is_file()
    assert (output / "student" / "validation" / "step-6.png").is_file()
