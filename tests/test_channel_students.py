"""Random Conditioning's channel-reduced students on the tiny teacher: an ARIA run with learned feature
projections (trained, checkpointed, resumed, left out of the export). Their configs: test_students.py."""

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, training_command

UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def channel_runs(assets, tmp_path_factory):
    """c_small with ARIA: 4 steps then resumed to 6, and 6 steps straight."""
    root = tmp_path_factory.mktemp("channel")
    common = ["--student_config", "c_small", "--condition_sampling", "aria", "--num_regions", "4",
              "--region_cache_dir", str(root / "regions"), "--aria_warmup_steps", "2", "--checkpointing_steps", "2"]
    interrupted, straight = root / "interrupted", root / "straight"
    first = run(training_command(assets, interrupted, *common, sampling="aria", steps=4))
    run(training_command(assets, interrupted, *common, "--resume_from_checkpoint", "latest", sampling="aria", steps=6))
    run(training_command(assets, straight, *common, sampling="aria", steps=6))
    return {"interrupted": interrupted, "straight": straight, "first_log": first.stderr}


def test_channel_reduced_student_trains_and_resumes_bit_identically(channel_runs):
    assert "feature projectors" in channel_runs["first_log"]  # counted in the memory report
    for folder in (channel_runs["interrupted"] / "checkpoint-6", channel_runs["straight"] / "checkpoint-6"):
        assert (folder / "feature_projectors.safetensors").is_file()
    resumed = load_file(str(channel_runs["interrupted"] / "checkpoint-6" / "feature_projectors.safetensors"))
    straight = load_file(str(channel_runs["straight"] / "checkpoint-6" / "feature_projectors.safetensors"))
    first = load_file(str(channel_runs["interrupted"] / "checkpoint-2" / "feature_projectors.safetensors"))
    assert resumed.keys() == straight.keys() and resumed
    assert all(torch.equal(resumed[key], straight[key]) for key in resumed)
    assert any(not torch.equal(first[key], resumed[key]) for key in first)  # the projections train
    resumed_unet = load_file(str(channel_runs["interrupted"] / UNET_WEIGHTS))
    straight_unet = load_file(str(channel_runs["straight"] / UNET_WEIGHTS))
    assert all(torch.equal(resumed_unet[key], straight_unet[key]) for key in resumed_unet)


def test_channel_reduced_export_loads_without_the_projectors(channel_runs, assets):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    output = channel_runs["straight"]
    pipeline = StableDiffusionPipeline.from_pretrained(str(output))
    teacher_widths = UNet2DConditionModel.load_config(assets["teacher"], subfolder="unet")["block_out_channels"]
    assert list(pipeline.unet.config.block_out_channels) != list(teacher_widths)
    images = pipeline("a red car", num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 1 and torch.isfinite(torch.as_tensor(images)).all()
    exported = [os.path.join(root, name) for root, _, names in os.walk(output) for name in names
                if "checkpoint-" not in root]
    assert not any(name.endswith("feature_projectors.safetensors") for name in exported)
    assert all("projections" not in key for key in load_file(str(output / UNET_WEIGHTS)))
