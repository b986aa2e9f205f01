"""Region-aware evaluation on the tiny teacher (issue acceptance: exact zero, determinism, training helps)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from aria_utils.evaluate import main as evaluate_cli
from aria_utils.evaluate import parse_args, run_evaluation
from aria_utils.evaluation.discrepancy import EvaluationError
from aria_utils.data.paired_data import load_paired_latents
from conftest import run, shared_region_index, training_command

NUM_REGIONS = 3


@pytest.fixture(scope="module")
def eval_assets(assets, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from aria_utils.families.unet_students import build_student

    root = tmp_path_factory.mktemp("evaluation")
    with open(assets["prompts"], encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    corpus = [row["prompt"] for row in rows]
    regions = shared_region_index(assets, corpus, NUM_REGIONS)
    # Held-out prompts: corpus prompts that are not in the paired set.
    paired = set(load_paired_latents(assets["teacher_data"]).captions)
    heldout = root / "heldout.csv"
    with open(heldout, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "category"])
        writer.writerows([(r["prompt"], r["category"]) for r in rows if r["prompt"] not in paired][:9])
    untrained = root / "untrained"
    build_student(UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet"), "bk_small") \
        .save_pretrained(str(untrained / "unet"))
    trained = root / "trained"
    run(training_command(assets, trained, "--checkpointing_steps", "1000", "--lambda_sd", "0",
                         sampling="paired", steps=40))
    return {"root": root, "regions": regions, "heldout": str(heldout), "untrained": str(untrained),
            "trained": str(trained), "teacher": assets["teacher"], "paired": assets["teacher_data"]}


def evaluate(eval_assets, output, *students, extra=()):
    argv = ["--teacher", eval_assets["teacher"], "--prompt_file", eval_assets["heldout"], "--category_column",
            "category", "--region_cache_dir", eval_assets["regions"], "--output_dir", str(output),
            "--num_timesteps", "3", "--num_inference_steps", "3", "--num_sample_prompts_per_region", "1",
            "--paired_data_dir", eval_assets["paired"], *extra]
    for student in students:
        argv += ["--student", student]
    return run_evaluation(parse_args(argv))


@pytest.fixture(scope="module")
def comparison(eval_assets):
    output = eval_assets["root"] / "comparison"
    report = evaluate(eval_assets, output, f"teacher={eval_assets['teacher']}",
                      f"untrained={eval_assets['untrained']}", f"trained={eval_assets['trained']}")
    return output, report


def test_teacher_against_itself_is_exactly_zero(comparison):
    _, report = comparison
    teacher = report["students"]["teacher"]
    assert teacher["discrepancy"]["mean"] == 0.0
    assert all(v["mean"] == 0.0 for v in teacher["discrepancy"]["per_region"].values())
    assert teacher["samples"]["latent_mse"] == 0.0


def test_evaluation_is_deterministic(eval_assets, comparison):
    _, first = comparison
    again = evaluate(eval_assets, eval_assets["root"] / "again", f"untrained={eval_assets['untrained']}")
    assert again["students"]["untrained"]["discrepancy"] == first["students"]["untrained"]["discrepancy"]
    assert again["students"]["untrained"]["samples"] == first["students"]["untrained"]["samples"]


def test_training_lowers_discrepancy_where_it_trained(comparison):
    _, report = comparison
    untrained = report["students"]["untrained"]["discrepancy"]["per_region"]
    trained = report["students"]["trained"]["discrepancy"]["per_region"]
    assert untrained["0"]["mean"] > 0
    # Every region holds paired training prompts here (see the 'seen' labels), and each improved.
    seen = [str(r["region"]) for r in report["regions"] if "seen" in r["labels"]]
    assert seen
    for region in seen:
        if region in trained:
            assert trained[region]["mean"] < untrained[region]["mean"], region


def test_report_files(comparison):
    output, report = comparison
    parsed = json.load(open(output / "report.json"))
    assert parsed["noise_seeds"] == [0] and "torch" in parsed["versions"] and "aria_utils.evaluate" in parsed["command"]
    markdown = (output / "report.md").read_text()
    for region in range(NUM_REGIONS):
        assert any(line.startswith(f"| {region} |") for line in markdown.splitlines()), region
    # One table with every student side by side.
    assert any(all(name in line for name in ("teacher", "untrained", "trained")) for line in markdown.splitlines())
    assert "per_category" in parsed["students"]["trained"]["discrepancy"]
    for name in ("discrepancy_per_region.png", "discrepancy_per_group.png"):
        with Image.open(output / name) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300
    with Image.open(output / "samples_trained.png") as grid:
        # Teacher row over student row, one column per sampled prompt, the 32 px images scaled to 128 px, with the
        # row names on the left and each column's prompt, region and seed above it.
        assert grid.size[0] > 128 * NUM_REGIONS and grid.size[1] > 2 * 128
        pixels = np.asarray(grid.convert("L"))
        assert (pixels[: grid.size[1] - 2 * 128] < 128).any()  # text in the header


def test_missing_prompt_file(eval_assets, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--teacher", eval_assets["teacher"], "--student", eval_assets["untrained"], "--prompt_file",
                    "/no/such/file.csv", "--region_cache_dir", eval_assets["regions"], "--output_dir", "/tmp/x"])
    assert "--prompt_file" in capsys.readouterr().err


def test_incompatible_student(eval_assets, tmp_path):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(eval_assets["teacher"], subfolder="unet")
    wrong = UNet2DConditionModel.from_config(dict(teacher.config, cross_attention_dim=48))
    wrong.save_pretrained(str(tmp_path / "wrong" / "unet"))
    with pytest.raises(EvaluationError, match="--student wrong.*cross_attention_dim=48"):
        evaluate(eval_assets, tmp_path / "out", f"wrong={tmp_path / 'wrong'}")


def test_region_cache_from_another_embedding_model(eval_assets, tmp_path):
    from aria_utils.cli import run_cli  # what `python -m aria_utils.evaluate` runs main with

    with pytest.raises(SystemExit, match="built with"):
        run_cli(evaluate_cli, ["--teacher", eval_assets["teacher"], "--student", eval_assets["untrained"],
                               "--prompt_file", eval_assets["heldout"], "--region_cache_dir", eval_assets["regions"],
                               "--output_dir", str(tmp_path), "--region_embedding_model",
                               "sentence-transformers/all-mpnet-base-v2"])


def test_training_logs_periodic_evaluation(assets, eval_assets, tmp_path):
    output = tmp_path / "run"
    run(training_command(assets, output, "--checkpointing_steps", "100", "--eval_prompt_file", eval_assets["heldout"],
                         "--eval_steps", "2", "--eval_num_timesteps", "2", "--report_to", "tensorboard",
                         "--validation_steps", "2", "--num_regions", "3", "--region_cache_dir", eval_assets["regions"],
                         sampling="aria", steps=4))
    assert sorted(os.listdir(output / "eval")) == ["history.jsonl", "step-2.png", "step-4.png"]
    history = [json.loads(line) for line in open(output / "eval" / "history.jsonl")]
    assert [record["step"] for record in history] == [2, 4] and all(record["mean"] > 0 for record in history)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "logs" / "aria-distill"))
    events.Reload()
    assert "eval/discrepancy_mean" in events.Tags()["scalars"]
    assert "eval/discrepancy_per_region" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("eval/discrepancy_mean")] == [2, 4]
    # ARIA's own visibility: per-region scalars every --validation_steps and the regions x steps heat map.
    scalars = events.Tags()["scalars"]
    for kind in ("discrepancy", "probability", "visits"):
        assert all(f"aria/{kind}/region_{k:02d}" in scalars for k in range(NUM_REGIONS)), kind
    assert "aria/region_discrepancy_heatmap" in events.Tags()["images"]
    assert {"loss/task", "loss/kd_output", "loss/kd_feat", "lr", "step_time", "samples_per_second"} <= set(scalars)


def test_validation_grid_columns_name_prompt_region_and_seed(tmp_path):
    """Each column: its prompt, then (a line of its own) its region's name and the seed of its image."""
    from diffusers import DDPMScheduler

    from aria_utils.training.validation_images import Validator, labelled_grid

    validator = Validator(["a cat", "a dog"], None, None, None, DDPMScheduler(), 32, 5, 2, 1.0, str(tmp_path), "cpu",
                          region_names=["3: cat, tiger, dog", "7: hedgehog, cat, dog"])
    # generate_images seeds the image of prompt i with seed + i
    assert validator.column_labels == ["a cat\nregion 3: cat, tiger, dog; seed 5",
                                       "a dog\nregion 7: hedgehog, cat, dog; seed 6"]
    images = np.zeros((1, 8, 8, 3))
    one_line = labelled_grid([images], ["teacher"], ["x y"], min_size=64)
    two_lines = labelled_grid([images], ["teacher"], ["x\ny"], min_size=64)
    assert two_lines.shape[0] == one_line.shape[0] + 18  # the line break is kept: one 18 px header line more
