"""SD 3.x teachers (issue 24): published transformer sizes, depth-pruned students, flow-matching noise, and the
whole path (RC and ARIA training, exact resume, SD3 pipeline export, LoRA, region-aware evaluation) on the tiny
SD3-topology teacher."""

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, run

# Transformer parameters as diffusers counts them (the published model cards: 2B, 2.5B, 8B).
PUBLISHED_TEACHERS = {"stable-diffusion-3-medium": 2.03e9, "stable-diffusion-3.5-medium": 2.24e9,
                      "stable-diffusion-3.5-large": 8.06e9}
# The students' counts from the same configs (README's table).
PUBLISHED_STUDENTS = {
    ("stable-diffusion-3-medium", "depth_1_2"): 1.009e9, ("stable-diffusion-3-medium", "depth_1_3"): 0.669e9,
    ("stable-diffusion-3.5-medium", "depth_1_2"): 1.108e9, ("stable-diffusion-3.5-medium", "depth_1_3"): 0.735e9,
    ("stable-diffusion-3.5-large", "depth_1_2"): 4.010e9, ("stable-diffusion-3.5-large", "depth_1_3"): 2.732e9,
}
TRANSFORMER_WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


def meta_transformer(config):
    from aria_utils.families import denoiser_on_meta_device
    from aria_utils.families.sd3 import STABLE_DIFFUSION_3

    return denoiser_on_meta_device(config, STABLE_DIFFUSION_3)


def count(model):
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_TEACHERS))
def test_published_sd3_sizes_and_their_depth_pruned_students(name):
    from aria_utils.families.sd3 import published_transformer_config, student_config_from_teacher, \
        student_to_teacher_key_map

    teacher = meta_transformer(published_transformer_config(name))
    assert abs(count(teacher) / PUBLISHED_TEACHERS[name] - 1) < 0.005
    teacher_state = teacher.state_dict()
    for variant in ("depth_1_2", "depth_1_3"):
        config = student_config_from_teacher(teacher.config, variant)
        student = meta_transformer(config)
        assert abs(count(student) / PUBLISHED_STUDENTS[(name, variant)] - 1) < 0.001
        # Every student weight has a teacher weight of its shape to start from.
        for key, teacher_key in student_to_teacher_key_map(student, teacher).items():
            assert teacher_state[teacher_key].shape == student.state_dict()[key].shape, key
        # Only the last block leaves out the text stream's update, in the teacher as in the student.
        assert [block.context_pre_only for block in student.transformer_blocks] == \
            [False] * (config["num_layers"] - 1) + [True]


def test_kept_blocks_spread_over_the_depth_and_dual_attention_follows_them():
    from aria_utils.families.sd3 import published_transformer_config, student_config_from_teacher

    teacher = published_transformer_config("stable-diffusion-3.5-medium")  # 24 blocks, 0-12 dual-attention
    half = student_config_from_teacher(teacher, "depth_1_2")
    # Kept blocks 0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23: the first six are dual-attention blocks.
    assert half["num_layers"] == 12 and half["dual_attention_layers"] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="depth_1_2, depth_1_3"):
        student_config_from_teacher(teacher, "bk_small")


def test_flow_matching_noise_and_sigma_sampling():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from aria_utils.families.noise import FlowMatchingNoise, FlowMatchingSampling
    from aria_utils.method.conditioning import random_conditioning_probability

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    noise = FlowMatchingNoise(scheduler)
    timesteps = noise.sample_timesteps(4096, torch.Generator().manual_seed(0))
    # Drawn from the scheduler's shifted table, as diffusers' SD3 scripts draw them.
    assert torch.isin(timesteps, scheduler.timesteps).all()
    sigmas = timesteps / 1000
    # Logit-normal u through the shift 3 puts the median sigma at 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert abs(sigmas.median().item() - 0.75) < 0.03
    latents, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    pair = timesteps[:2]
    sigma = (pair / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(noise.noisy_latents(latents, eps, pair), (1 - sigma) * latents + sigma * eps)
    assert torch.equal(noise.target(latents, eps, pair), eps - latents)
    # RC's p(t) on this time axis is p(sigma) = exp(-lambda (1 - sigma)).
    assert torch.allclose(random_conditioning_probability(pair, 1000, "exp", 5.0),
                          torch.exp(-5.0 * (1 - pair.double() / 1000)))
    # sigma < 0.3 is u < 0.125 before the shift: 12.5 % of uniform draws, 2.6 % of logit-normal ones.
    uniform = FlowMatchingNoise(scheduler, FlowMatchingSampling(weighting_scheme="none"))
    assert ((uniform.sample_timesteps(4096, torch.Generator().manual_seed(0)) / 1000) < 0.3).float().mean() > 0.1
    assert (sigmas < 0.3).float().mean() < 0.05
    assert noise.loss_weights(pair) is None
    weighted = FlowMatchingNoise(scheduler, FlowMatchingSampling(weighting_scheme="sigma_sqrt"))
    assert torch.allclose(weighted.loss_weights(pair), (pair / 1000).float() ** -2)


def test_prompt_encoder_matches_the_sd3_pipeline(sd3_assets):
    from diffusers import StableDiffusion3Pipeline

    from aria_utils.families import load_frozen_teacher

    teacher = load_frozen_teacher(sd3_assets["teacher"])
    assert teacher.family.name == "sd3"
    prompts = ["a violin on a wooden table", "an oil painting of a harbour at dusk"]
    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3_assets["teacher"])
    with torch.no_grad():
        states, added = teacher.prompt_encoder(max_sequence_length=20).encode_prompts(prompts, "cpu")
        expected, _, pooled, _ = pipeline.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                        max_sequence_length=20)
    assert states.shape == (2, 77 + 20, teacher.unet.config.joint_attention_dim)
    assert torch.equal(states, expected) and torch.equal(added["pooled_projections"], pooled)


def sd3_command(sd3_assets, output_dir, *extra, sampling="aria", steps=6):
    return [
        sys.executable, os.path.join(REPO_ROOT, "train_aria_distill.py"),
        "--pretrained_model_name_or_path", sd3_assets["teacher"], "--train_data_dir", sd3_assets["teacher_data"],
        "--prompt_file", sd3_assets["prompts"], "--condition_sampling", sampling, "--num_regions", "3",
        "--region_cache_dir", sd3_assets["region_cache"], "--student_config", "depth_1_2", "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--report_to", "none",
        "--max_sequence_length", "16", "--output_dir", str(output_dir), "--speed_report_repeats", "0", *extra,
    ]


@pytest.fixture(scope="module")
def sd3_assets(assets, tmp_path_factory):
    from aria_utils.fixtures.tiny_teacher import save_tiny_teacher
    from aria_utils.generate_teacher_data import main as generate_teacher_data

    root = tmp_path_factory.mktemp("sd3")
    teacher = str(root / "tiny-sd3-teacher")
    save_tiny_teacher(teacher, seed=0, sd3=True)
    teacher_data = str(root / "teacher-data")
    generate_teacher_data(["--pretrained_model_name_or_path", teacher, "--prompt_file", assets["prompts"],
                           "--num_prompts", "16", "--num_inference_steps", "2", "--batch_size", "8",
                           "--output_dir", teacher_data])
    return {"root": root, "teacher": teacher, "teacher_data": teacher_data, "prompts": assets["prompts"],
            "region_cache": assets["region_cache"]}


@pytest.fixture(scope="module")
def sd3_runs(sd3_assets):
    """ARIA with EMA: 2 steps then resumed to 4, and 4 in one go. RC: a LoRA on the depth_1_3 student."""
    root = sd3_assets["root"]
    common = ["--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "2", "--aria_warmup_steps", "2",
              "--weighting_scheme", "logit_normal"]
    run(sd3_command(sd3_assets, root / "interrupted", *common, steps=2))
    run(sd3_command(sd3_assets, root / "interrupted", *common, "--resume_from_checkpoint", "latest", steps=4))
    run(sd3_command(sd3_assets, root / "straight", *common, "--validation_prompts", "a violin on a table",
                    "--validation_steps", "4", "--validation_inference_steps", "2", steps=4))
    run(sd3_command(sd3_assets, root / "lora", "--use_lora", "--lora_rank", "4", "--student_config", "depth_1_3",
                    sampling="random", steps=3))
    return {"interrupted": root / "interrupted", "straight": root / "straight", "lora": root / "lora"}


def test_sd3_resumed_run_equals_straight_run(sd3_runs):
    resumed = load_file(str(sd3_runs["interrupted"] / TRANSFORMER_WEIGHTS))
    straight = load_file(str(sd3_runs["straight"] / TRANSFORMER_WEIGHTS))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in resumed)
    states = [json.load(open(sd3_runs[name] / "checkpoint-4" / "training_state.json")) for name in
              ("interrupted", "straight")]
    assert states[0]["tracker"] == states[1]["tracker"] and states[0]["tracker"]["num_steps"] == 4
    assert (sd3_runs["straight"] / "checkpoint-4" / "transformer_ema").is_dir()


def test_sd3_student_exports_as_an_sd3_pipeline(sd3_runs, sd3_assets):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from aria_utils.families.sd3 import build_student

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(sd3_runs["straight"]))
    assert len(pipeline.transformer.transformer_blocks) == 3  # 6 teacher blocks, half kept
    images = pipeline("a violin on a table", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # Trained: the exported transformer is not the initial copy of teacher blocks.
    initial = build_student(SD3Transformer2DModel.from_pretrained(sd3_assets["teacher"], subfolder="transformer"),
                            "depth_1_2")
    trained = pipeline.transformer.state_dict()
    assert any(not torch.equal(trained[key], value) for key, value in initial.state_dict().items())
    card = (sd3_runs["straight"] / "README.md").read_text()
    assert "license_name: stabilityai-ai-community" in card and "StableDiffusion3Pipeline" in card
    assert (sd3_runs["straight"] / "validation" / "step-4.png").is_file()


def test_sd3_lora_student_loads_with_load_lora_weights(sd3_runs):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(sd3_runs["lora"]))
    before = pipeline("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    with warnings.catch_warnings():
        # peft warns when adapter weights it was told about are missing from the file: every one must load.
        warnings.simplefilter("error", RuntimeWarning)
        pipeline.load_lora_weights(str(sd3_runs["lora"]))
    after = pipeline("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert pipeline.get_active_adapters() and not np.array_equal(before, after)


def test_sd3_region_aware_evaluation_of_the_teacher_against_itself_is_zero(sd3_runs, sd3_assets):
    from aria_utils.evaluate import parse_args, run_evaluation
    from aria_utils.method.region_index import DEFAULT_EMBEDDING_MODEL, index_folder, region_fingerprint
    from aria_utils.data.prompts import load_prompt_corpus

    corpus = load_prompt_corpus(sd3_assets["prompts"]).prompts
    regions = index_folder(sd3_assets["region_cache"], region_fingerprint(corpus, DEFAULT_EMBEDDING_MODEL, 3, 0))
    report = run_evaluation(parse_args([
        "--teacher", sd3_assets["teacher"], "--prompt_file", sd3_assets["prompts"], "--max_prompts", "6",
        "--region_cache_dir", regions, "--output_dir", str(sd3_assets["root"] / "evaluation"),
        "--num_timesteps", "2", "--num_inference_steps", "2", "--num_sample_prompts_per_region", "1",
        "--student", f"teacher={sd3_assets['teacher']}", "--student", f"trained={sd3_runs['straight']}"]))
    teacher, trained = report["students"]["teacher"], report["students"]["trained"]
    assert teacher["discrepancy"]["mean"] == 0.0 and teacher["samples"]["latent_mse"] == 0.0
    assert all(value["mean"] == 0.0 for value in teacher["discrepancy"]["per_region"].values())
    assert trained["discrepancy"]["mean"] > 0.0


def test_sd3_checkpoints_are_recognised_from_configs_and_single_files(tmp_path):
    from safetensors.torch import save_file

    from aria_utils.families import family_of_config, family_of_single_file
    from aria_utils.families.sd3 import published_transformer_config

    assert family_of_config(published_transformer_config("stable-diffusion-3.5-large")).name == "sd3"
    # The original MMDiT layout (as in sd3.5_medium.safetensors), against an SD-1.x one.
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
              str(tmp_path / "sd3.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "sd1.safetensors"))
    assert family_of_single_file(str(tmp_path / "sd3.safetensors")).name == "sd3"
    assert family_of_single_file(str(tmp_path / "sd1.safetensors")).name == "sd"
