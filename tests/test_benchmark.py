"""The benchmark's guard rails: its teacher must depend on the prompt, and the runner checks that.

The benchmark's numbers themselves live in README / examples/benchmark (they take minutes to hours).
"""

import json
import os
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "examples", "benchmark"))

import conditioned_teacher  # noqa: E402
import run_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def corpus(assets):
    from aria_utils.prompts import load_prompt_corpus

    loaded = load_prompt_corpus(prompt_file=assets["prompts"], category_column="category")
    return conditioned_teacher.sample_per_category(loaded.prompts, loaded.categories, 4, seed=0)


def test_cross_attention_gain_makes_the_prompt_matter(corpus):
    prompts, categories = corpus
    plain = conditioned_teacher.conditioning_strength(conditioned_teacher.build_teacher(0, 1.0), prompts, categories, 0)
    amplified = conditioned_teacher.conditioning_strength(conditioned_teacher.build_teacher(0, 20.0), prompts,
                                                          categories, 0)
    assert plain["prompt_share"] < run_benchmark.MIN_PROMPT_SHARE <= amplified["prompt_share"]
    assert 0.0 < amplified["between_category_share"] <= 1.0


def test_runner_refuses_a_teacher_that_ignores_its_prompt(tmp_path):
    teacher = tmp_path / "weak-teacher"
    conditioned_teacher.main(["--prompt_file", _demo_corpus(tmp_path), "--output_dir", str(teacher),
                              "--cross_attention_gain", "1"])
    assert json.loads((teacher / "conditioning_strength.json").read_text())["prompt_share"] < run_benchmark.MIN_PROMPT_SHARE
    with pytest.raises(SystemExit, match="does not depend enough on its prompt"):
        run_benchmark.main(["--output_dir", str(tmp_path / "bench"), "--quick", "--teacher_dir", str(teacher)])
    assert not (tmp_path / "bench" / "paired").exists()  # refused before any generation or training


def _demo_corpus(tmp_path):
    from aria_utils.demo_corpus import write_demo_corpus

    return write_demo_corpus(str(tmp_path / "corpus"))
