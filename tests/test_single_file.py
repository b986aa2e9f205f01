"""A community checkpoint given as one original-layout `.safetensors` file loads as the teacher.

The fixture is the tiny teacher rewritten in the original Stable Diffusion key layout
(tests/ldm_single_file.py); `--single_file_config` points at a diffusers folder with the matching
configs, which is how the conversion works offline.
"""

import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run, training_command
from ldm_single_file import save_ldm_single_file


@pytest.fixture(scope="module")
def community_checkpoint(assets, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(assets["teacher"])
    return save_ldm_single_file(pipeline, str(tmp_path_factory.mktemp("single-file") / "community-model.safetensors"))


def single_file_command(assets, community_checkpoint, output, *extra, steps=2):
    command = training_command(assets, output, "--single_file_config", assets["teacher"], "--checkpointing_steps", "2",
                               *extra, steps=steps)
    command[command.index("--pretrained_model_name_or_path") + 1] = community_checkpoint
    return command


def test_fixture_uses_the_original_layout(community_checkpoint):
    with safe_open(community_checkpoint, "pt") as handle:
        keys = list(handle.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in keys)
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys


def test_single_file_teacher_trains_resumes_and_exports(assets, community_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "out"
    run(single_file_command(assets, community_checkpoint, output, steps=2))

    converted = output / "teacher_diffusers"
    for component in ("unet", "vae", "text_encoder"):
        original = load_file(os.path.join(assets["teacher"], component, "diffusion_pytorch_model.safetensors"
                                          if component != "text_encoder" else "model.safetensors"))
        loaded = load_file(str(converted / component / ("diffusion_pytorch_model.safetensors"
                                                        if component != "text_encoder" else "model.safetensors")))
        assert original.keys() == loaded.keys(), component
        assert all(torch.equal(original[key], loaded[key]) for key in original), component

    record = converted / "aria_single_file_source.json"
    converted_at = record.stat().st_mtime_ns
    run(single_file_command(assets, community_checkpoint, output, "--resume_from_checkpoint", "latest", steps=3))
    assert record.stat().st_mtime_ns == converted_at  # the unchanged file is not converted again
    assert json.loads((output / "training_args.json").read_text())["pretrained_model_name_or_path"] == community_checkpoint
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 3

    pipeline = StableDiffusionPipeline.from_pretrained(str(output))
    image = pipeline("a red bicycle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape[-1] == 3
    card = (output / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in metadata  # a file path is no hub id: the Hub would refuse the card
    assert metadata["license"] == "creativeml-openrail-m" and community_checkpoint in card  # named in the text
