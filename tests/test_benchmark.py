"""The benchmark's guard rails and its ground truth: the teachers it builds, and the metrics it reports.

The benchmark's numbers themselves live in README / examples/benchmark (they take minutes).
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "examples", "benchmark"))

import conditioned_teacher  # noqa: E402
import planted_teacher  # noqa: E402
import run_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def corpus(assets):
    from aria_utils.data.prompts import load_prompt_corpus

    loaded = load_prompt_corpus(prompt_file=assets["prompts"], category_column="category")
    return conditioned_teacher.sample_per_category(loaded.prompts, loaded.categories, 24, seed=0)


def test_cross_attention_gain_makes_the_prompt_matter(corpus):
    prompts, categories = corpus
    plain = conditioned_teacher.conditioning_strength(conditioned_teacher.build_teacher(0, 1.0), prompts, categories, 0)
    amplified = conditioned_teacher.conditioning_strength(conditioned_teacher.build_teacher(0, 20.0), prompts,
                                                          categories, 0)
    assert plain["prompt_share"] < run_benchmark.MIN_PROMPT_SHARE <= amplified["prompt_share"]
    assert 0.0 < amplified["between_category_share"] <= 1.0


def test_runner_refuses_a_teacher_that_ignores_its_prompt(tmp_path, corpus):
    teacher = tmp_path / "weak-teacher"
    prompts, categories = corpus
    pipeline = conditioned_teacher.build_teacher(0, 1.0)
    pipeline.save_pretrained(teacher)
    (teacher / "conditioning_strength.json").write_text(json.dumps(
        conditioned_teacher.conditioning_strength(pipeline, prompts, categories, 0)))
    with pytest.raises(SystemExit, match="does not depend enough on its prompt"):
        run_benchmark.check_teacher_strength(str(teacher))


@pytest.fixture(scope="module")
def planted(corpus):
    """The conditioned teacher, and the same teacher with one planted concept."""
    prompts, categories = corpus
    base = conditioned_teacher.build_teacher(0, 20.0)
    concept = "musical_instruments"
    teacher, record = planted_teacher.build_planted_teacher(prompts, categories, [concept], 1.0, seed=0)
    return {"base": base, "teacher": teacher, "record": record, "concept": concept}


def test_planted_layers_are_the_ones_every_bk_student_drops(planted):
    from aria_utils.families.unet_students import BK_VARIANTS, build_student

    teacher_unet, base_unet = planted["teacher"].unet, planted["base"].unet
    assert planted["record"]["layers"], "nothing was planted"
    for variant in BK_VARIANTS:
        # BK-SDM's init copies the kept layers only: the planted concept never reaches the student.
        from_planted = build_student(teacher_unet, variant).state_dict()
        from_base = build_student(base_unet, variant).state_dict()
        assert all(torch.equal(from_planted[key], from_base[key]) for key in from_base), variant
    changed = {name.rsplit(".transformer_blocks", 1)[0] for name, value in teacher_unet.state_dict().items()
               if not torch.equal(value, base_unet.state_dict()[name])}
    assert changed == set(planted["record"]["layers"])


def test_planted_concept_moves_the_teacher_on_its_prompts_only(planted, corpus):
    prompts, categories = corpus
    teacher, base = planted["teacher"], planted["base"]
    ids = teacher.tokenizer(prompts, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    x = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 500)
    with torch.no_grad():
        states = teacher.text_encoder(ids, return_dict=False)[0]
        shift = (teacher.unet(x, t, states).sample - base.unet(x, t, states).sample).pow(2).flatten(1).mean(1)
    is_concept = np.asarray(categories) == planted["concept"]
    assert shift[is_concept].mean() > 5 * shift[~is_concept].mean()
    concept_record = planted["record"]["concepts"][planted["concept"]]
    assert concept_record["score_inside_mean"] > 3.0  # separated by several outside standard deviations


def test_steps_to_reach_interpolates_and_says_never():
    steps, values = np.array([0.0, 10.0, 20.0]), np.array([1.0, 0.6, 0.2])
    assert run_benchmark.steps_to_reach(steps, values, 0.4) == pytest.approx(15.0)
    assert run_benchmark.steps_to_reach(steps, values, 1.0) == 0.0
    assert run_benchmark.steps_to_reach(steps, values, 0.1) is None


def test_area_under_curve_is_the_mean_over_training():
    steps = np.array([0.0, 10.0, 30.0])
    assert run_benchmark.area_under_curve(steps, np.array([2.0, 2.0, 2.0])) == pytest.approx(2.0)
    assert run_benchmark.area_under_curve(steps, np.array([3.0, 1.0, 1.0])) == pytest.approx((20 + 20) / 30)


def test_region_purity_coverage_and_share():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    categories = ["c", "c", "x", "c", "x", "x", "x", "x", "x", "x"]
    result = run_benchmark.region_purity(labels, categories, "c", 3)
    assert result["regions"] == [0, 1]
    assert result["coverage"] == pytest.approx(1.0)
    assert result["purity"] == pytest.approx(3 / 5)
    assert result["corpus_share"] == pytest.approx(0.3)


def test_a_benchmark_folder_is_resumed_only_by_the_same_benchmark(tmp_path):
    quick_planted = {"setting": "planted", "budget": "quick", "prompt_file": None}
    run_benchmark.claim_output_dir(str(tmp_path), quick_planted)
    run_benchmark.claim_output_dir(str(tmp_path), dict(quick_planted))  # the same command resumes
    with pytest.raises(SystemExit, match="other budget, setting"):
        run_benchmark.claim_output_dir(str(tmp_path), dict(quick_planted, setting="smooth", budget="default"))
