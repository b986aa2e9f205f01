"""End-to-end runs of train_aria_distill.py on the tiny teacher, in the style of diffusers' example tests."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, training_command

UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def checkpoint_names(output_dir):
    return {name for name in os.listdir(output_dir) if name.startswith("checkpoint-")}


def single_file_copy(sharded_dir, folder):
    """The same paired set in the single-file layout of earlier versions (latents.safetensors + metadata.jsonl)."""
    import numpy as np
    from safetensors.torch import save_file

    from aria_utils.data.paired_data import LATENTS_FILE, METADATA_FILE, load_paired_latents

    paired = load_paired_latents(sharded_dir)
    os.makedirs(folder)
    save_file({"latents": paired.latents(np.arange(len(paired))).half()}, os.path.join(folder, LATENTS_FILE))
    with open(os.path.join(folder, METADATA_FILE), "w") as handle:
        handle.writelines(json.dumps({"index": i, "caption": c}) + "\n" for i, c in enumerate(paired.captions))
    return str(folder)


@pytest.fixture(scope="module")
def resumable_runs(assets, tmp_path_factory):
    """Run A: 6 steps then resumed to 8, with 2 DataLoader workers. Run B: 8 steps in one go, no workers.
    Run C: as B on the same paired set stored in the single-file layout. Same flags otherwise."""
    root = tmp_path_factory.mktemp("resume")
    regions = str(root / "regions")
    common = ["--condition_sampling", "aria", "--num_regions", "4", "--region_cache_dir", regions,
              "--aria_warmup_steps", "2", "--use_ema", "--ema_decay", "0.9", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "2"]
    interrupted, uninterrupted, single_file = root / "interrupted", root / "uninterrupted", root / "single_file"
    workers = ["--dataloader_num_workers", "2"]
    first = run(training_command(assets, interrupted, *common, *workers, "--checkpoints_total_limit", "2",
                                 sampling="aria", steps=6))
    after_first = checkpoint_names(interrupted)
    resumed = run(training_command(assets, interrupted, *common, *workers, "--checkpoints_total_limit", "2",
                                   "--resume_from_checkpoint", "latest", sampling="aria", steps=8))
    run(training_command(assets, uninterrupted, *common, sampling="aria", steps=8))
    single_file_assets = dict(assets, teacher_data=single_file_copy(assets["teacher_data"], root / "single-file-data"))
    run(training_command(single_file_assets, single_file, *common, sampling="aria", steps=8))
    return {"interrupted": interrupted, "uninterrupted": uninterrupted, "single_file": single_file,
            "after_first": after_first, "first_log": first.stderr, "resumed_log": resumed.stderr}


def test_checkpoint_rotation_and_resume_from_latest(resumable_runs):
    assert resumable_runs["after_first"] == {"checkpoint-4", "checkpoint-6"}
    assert checkpoint_names(resumable_runs["interrupted"]) == {"checkpoint-6", "checkpoint-8"}
    assert "Resuming from" in resumable_runs["resumed_log"] and "checkpoint-6" in resumable_runs["resumed_log"]
    state = json.load(open(resumable_runs["interrupted"] / "checkpoint-8" / "training_state.json"))
    assert state["global_step"] == 8
    # Checkpoints hold the student (and EMA) as diffusers folders in safetensors.
    assert (resumable_runs["interrupted"] / "checkpoint-8" / UNET_WEIGHTS).is_file()
    assert (resumable_runs["interrupted"] / "checkpoint-8" / "unet_ema").is_dir()


def test_resumed_run_equals_uninterrupted_run(resumable_runs):
    resumed = load_file(str(resumable_runs["interrupted"] / UNET_WEIGHTS))
    straight = load_file(str(resumable_runs["uninterrupted"] / UNET_WEIGHTS))
    assert resumed.keys() == straight.keys()
    for key in resumed:
        assert torch.equal(resumed[key], straight[key]), key
    state_resumed = json.load(open(resumable_runs["interrupted"] / "checkpoint-8" / "training_state.json"))
    state_straight = json.load(open(resumable_runs["uninterrupted"] / "checkpoint-8" / "training_state.json"))
    assert state_resumed["tracker"] == state_straight["tracker"]
    assert state_resumed["tracker"]["num_steps"] == 8


def test_sharded_and_single_file_paired_sets_train_identically(resumable_runs):
    sharded = load_file(str(resumable_runs["uninterrupted"] / UNET_WEIGHTS))
    single_file = load_file(str(resumable_runs["single_file"] / UNET_WEIGHTS))
    assert all(torch.equal(sharded[key], single_file[key]) for key in sharded)


def test_training_changed_the_student(resumable_runs, assets):
    from diffusers import UNet2DConditionModel

    from aria_utils.families.unet_students import build_student

    initial = build_student(UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet"), "bk_small")
    trained = load_file(str(resumable_runs["uninterrupted"] / UNET_WEIGHTS))
    assert any(not torch.equal(trained[k], v) for k, v in initial.state_dict().items())


def test_output_pipeline_loads_and_runs(resumable_runs):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(resumable_runs["interrupted"]))
    assert pipeline.unet.config.mid_block_type is None  # the bk_small student, not the teacher
    images = pipeline("a violin on a stage", num_inference_steps=2, output_type="np",
                      generator=torch.manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_aria_outputs(resumable_runs):
    report = json.load(open(resumable_runs["interrupted"] / "aria_regions.json"))
    assert report["num_regions"] == 4 and len(report["regions"]) == 4
    assert abs(sum(r["probability"] for r in report["regions"]) - 1.0) < 1e-9
    assert sum(r["size"] for r in report["regions"]) > 0 and all(r["representatives"] for r in report["regions"])
    assert (resumable_runs["interrupted"] / "aria_regions.png").is_file()
    args = json.load(open(resumable_runs["interrupted"] / "training_args.json"))
    assert "hub_token" not in args


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_prediction_teachers(assets, tmp_path, prediction_type):
    from aria_utils.fixtures.tiny_teacher import save_tiny_teacher

    teacher = str(tmp_path / "teacher")
    save_tiny_teacher(teacher, seed=1, prediction_type=prediction_type)
    v_assets = dict(assets, teacher=teacher)
    result = run(training_command(v_assets, tmp_path / "out", "--checkpointing_steps", "100",
                                  "--max_train_samples", "8", steps=2))
    assert "Paired latents = 8," in result.stderr  # --max_train_samples keeps the first 8 of 48
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipeline.scheduler.config.prediction_type == prediction_type


def test_image_folder_is_encoded_once_and_cached(assets, tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for index in range(6):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": f"a photo of thing {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    image_assets = dict(assets, teacher_data=str(folder))
    output = tmp_path / "out"
    run(training_command(image_assets, output, "--checkpointing_steps", "100", "--dataloader_num_workers", "2",
                         steps=2, sampling="paired"))
    caches = os.listdir(output / "latent_cache")
    assert len(caches) == 1
    first_weights = load_file(str(output / UNET_WEIGHTS))
    second = run(training_command(image_assets, output, "--checkpointing_steps", "100", "--overwrite_output_dir",
                                  steps=2, sampling="paired"))  # a new run; the latent cache is kept
    assert "Reusing VAE latents" in second.stderr
    # The run that encoded and the run that reused the cache trained on the same (float16) latents.
    second_weights = load_file(str(output / UNET_WEIGHTS))
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
