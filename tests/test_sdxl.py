"""SDXL teachers and KOALA students (issue 17): sizes from the full SDXL config, and the whole training path on
the tiny SDXL-topology teacher (two text encoders, pooled embeddings, time ids)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run, training_command

UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape the network.
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# KOALA (Lee et al. 2023), table 1: SDXL-base 2,567M, KOALA-1B 1,161M, KOALA-700M 782M / 783M UNet parameters.
PAPER_PARAMETERS = {"teacher": 2567e6, "koala_1b": 1161e6, "koala_700m": 783e6}


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: 2.5B parameters without allocating them
        return UNet2DConditionModel.from_config(config)


@pytest.fixture(scope="module")
def full_sdxl_teacher():
    return meta_unet(SDXL_BASE_UNET)


@pytest.mark.parametrize("variant", ["koala_1b", "koala_700m"])
def test_koala_sizes_from_the_full_sdxl_config(full_sdxl_teacher, variant):
    from aria_utils.families.unet_students import count_parameters, student_config_from_teacher

    teacher_count = count_parameters(full_sdxl_teacher)
    assert abs(teacher_count - PAPER_PARAMETERS["teacher"]) / PAPER_PARAMETERS["teacher"] < 0.005, teacher_count
    student = meta_unet(student_config_from_teacher(full_sdxl_teacher.config, variant))
    count = count_parameters(student)
    assert abs(count - PAPER_PARAMETERS[variant]) / PAPER_PARAMETERS[variant] < 0.005, (variant, count)
    assert student.config.layers_per_block == 1
    assert (student.mid_block is not None) == (variant == "koala_1b")


@pytest.mark.parametrize("variant", ["bk_base", "bk_small", "koala_1b", "koala_700m"])
def test_full_sdxl_students_map_every_weight_to_a_teacher_weight_of_its_shape(full_sdxl_teacher, variant):
    from aria_utils.families.unet_students import feature_layer_pairs, student_config_from_teacher, student_to_teacher_key_map

    student = meta_unet(student_config_from_teacher(full_sdxl_teacher.config, variant))
    teacher_state, student_state = full_sdxl_teacher.state_dict(), student.state_dict()
    mapping = student_to_teacher_key_map(student, full_sdxl_teacher)
    assert set(mapping) == set(student_state)
    for student_key, teacher_key in mapping.items():
        assert teacher_state[teacher_key].shape == student_state[student_key].shape, (student_key, teacher_key)
    # Feature KD compares every stage output of the same resolution.
    assert [pair[0] for pair in feature_layer_pairs(student, full_sdxl_teacher)] == \
        [f"down_blocks.{i}" for i in range(3)] + [f"up_blocks.{i}" for i in range(3)]


def test_koala_transformer_blocks_start_from_evenly_spread_teacher_blocks(full_sdxl_teacher):
    from aria_utils.families.unet_students import kept_transformer_blocks, student_config_from_teacher, student_to_teacher_key_map

    assert kept_transformer_blocks(6, 10) == [0, 2, 4, 5, 7, 9]
    assert kept_transformer_blocks(5, 10) == [0, 2, 5, 7, 9]
    assert kept_transformer_blocks(2, 2) == [0, 1]
    student = meta_unet(student_config_from_teacher(full_sdxl_teacher.config, "koala_1b"))
    mapping = student_to_teacher_key_map(student, full_sdxl_teacher)
    suffix = "transformer_blocks.{}.attn1.to_q.weight"
    # Down stage 2 keeps its first attention; its 6 blocks come from teacher blocks 0, 2, 4, 5, 7, 9.
    assert [mapping[f"down_blocks.2.attentions.0.{suffix.format(i)}"] for i in range(6)] == \
        [f"down_blocks.2.attentions.0.{suffix.format(i)}" for i in (0, 2, 4, 5, 7, 9)]
    # Up stage 0: the student's last attention (1 of 2) starts from the teacher's last (2 of 3).
    assert mapping[f"up_blocks.0.attentions.1.{suffix.format(5)}"] == f"up_blocks.0.attentions.2.{suffix.format(9)}"
    assert mapping[f"mid_block.attentions.0.{suffix.format(3)}"] == f"mid_block.attentions.0.{suffix.format(5)}"


def test_koala_needs_an_sdxl_teacher(assets):
    from diffusers import UNet2DConditionModel

    from aria_utils.families.unet_students import student_config_from_teacher

    config = UNet2DConditionModel.load_config(assets["teacher"], subfolder="unet")
    with pytest.raises(ValueError, match="--student_config koala_1b is a KOALA student of an SDXL teacher"):
        student_config_from_teacher(config, "koala_1b")


# ----------------------------------------------------------------------------------------------- tiny SDXL teacher
@pytest.fixture(scope="module")
def sdxl_assets(assets, tmp_path_factory):
    from aria_utils.generate_teacher_data import main as generate_teacher_data
    from aria_utils.fixtures.tiny_teacher import main as tiny_teacher

    root = tmp_path_factory.mktemp("sdxl")
    teacher = str(root / "tiny-sdxl-teacher")
    tiny_teacher(["--sdxl", "--output_dir", teacher])
    teacher_data = str(root / "teacher-data")
    generate_teacher_data([
        "--pretrained_model_name_or_path", teacher, "--prompt_file", assets["prompts"], "--num_prompts", "24",
        "--num_inference_steps", "2", "--batch_size", "8", "--shard_size", "16", "--output_dir", teacher_data,
    ])
    return dict(assets, root=root, teacher=teacher, teacher_data=teacher_data)


def test_tiny_sdxl_teacher_has_the_sdxl_topology(sdxl_assets):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_assets["teacher"])
    unet = pipeline.unet.config
    assert unet.addition_embed_type == "text_time" and list(unet.transformer_layers_per_block) == [1, 2, 10]
    assert list(unet.down_block_types) == SDXL_BASE_UNET["down_block_types"]
    assert type(pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline.tokenizer_2.pad_token == "!" and pipeline.tokenizer.pad_token == "<|endoftext|>"


def test_prompt_encoder_conditions_like_the_sdxl_pipeline(sdxl_assets):
    from diffusers import StableDiffusionXLPipeline

    from aria_utils.families import load_frozen_teacher
    from aria_utils.families.sdxl import default_time_ids

    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_assets["teacher"])
    prompt_encoder = load_frozen_teacher(sdxl_assets["teacher"]).prompt_encoder()
    prompts = ["a red bicycle leaning on a wall", "two cats"]
    with torch.no_grad():
        states, added = prompt_encoder.encode_prompts(prompts, "cpu", default_time_ids(32, 2))
        expected_states, _, expected_pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(states, expected_states) and torch.equal(added["text_embeds"], expected_pooled)
    assert added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with pytest.raises(ValueError, match="time_ids"):
        prompt_encoder.encode(prompt_encoder.tokenize(prompts))


def test_sdxl_teacher_latents_store_their_micro_conditioning(sdxl_assets):
    from aria_utils.data.paired_data import load_paired_latents

    paired = load_paired_latents(sdxl_assets["teacher_data"])
    assert paired.latent_shape == (4, 16, 16)
    assert paired.time_ids([0, 5, 23]).tolist() == [[32, 32, 0, 0, 32, 32]] * 3
    assert len(paired.micro_conditioning) == 1  # identical rows are held once


def test_per_image_micro_conditioning_reaches_the_micro_batches(tmp_path):
    from diffusers import DDPMScheduler

    from aria_utils.data.paired_data import PairedDataError, load_paired_latents, save_paired_latents
    from aria_utils.data.step_batches import PairedMicroBatches
    from aria_utils.families.noise import DiscreteNoise

    latents = torch.randn(4, 4, 8, 8)
    micro = [[64 + i, 48, i, 0, 32, 32] for i in range(4)]
    save_paired_latents(str(tmp_path / "set"), latents, [f"caption {i}" for i in range(4)],
                        extra_rows=[{"micro_conditioning": row} for row in micro])
    paired = load_paired_latents(str(tmp_path / "set"))
    assert paired.time_ids([3, 1]).tolist() == [micro[3], micro[1]]
    assert paired.truncated(2).time_ids([1]).tolist() == [micro[1]]
    batches = PairedMicroBatches(paired, 2, 1, 0, 1, 0, DiscreteNoise(DDPMScheduler()), np.full(4, -1), 2, default_time_ids=[9] * 6)
    item = batches[0]
    captions = list(item["captions"])
    assert item["time_ids"].tolist() == [micro[int(caption.split()[1])] for caption in captions]
    # A set without micro-conditioning (SD-made, or older) gets the default.
    save_paired_latents(str(tmp_path / "plain"), latents, [f"caption {i}" for i in range(4)])
    plain = PairedMicroBatches(load_paired_latents(str(tmp_path / "plain")), 2, 1, 0, 1, 0, DiscreteNoise(DDPMScheduler()), np.full(4, -1), 2,
                               default_time_ids=[9] * 6)
    assert plain[0]["time_ids"].tolist() == [[9] * 6] * 2
    # Rows that only partly carry it are refused.
    save_paired_latents(str(tmp_path / "mixed"), latents, [f"caption {i}" for i in range(4)],
                        extra_rows=[{"micro_conditioning": micro[0]}, {}, {}, {}])
    with pytest.raises(PairedDataError, match="lack the micro_conditioning"):
        load_paired_latents(str(tmp_path / "mixed"))


def test_images_record_original_size_and_crop():
    from PIL import Image

    from aria_utils.data.paired_data import _image_to_tensor

    pixels, micro = _image_to_tensor(Image.new("RGB", (96, 48)), 32)  # width 96, height 48 -> 64 x 32, crop 16
    assert tuple(pixels.shape) == (3, 32, 32)
    assert micro.tolist() == [48, 96, 0, 16, 32, 32]


def sdxl_command(sdxl_assets, output_dir, *extra, sampling="aria", steps=4, student="koala_700m"):
    command = training_command(sdxl_assets, output_dir, "--num_regions", "4", *extra, sampling=sampling, steps=steps)
    command[command.index("--student_config") + 1] = student
    return command


@pytest.fixture(scope="module")
def sdxl_runs(sdxl_assets, tmp_path_factory):
    """ARIA koala_700m: 4 steps then resumed to 6, and 6 in one go. RC koala_1b with validation and evaluation.
    A LoRA run."""
    root = tmp_path_factory.mktemp("sdxl-runs")
    regions = ["--region_cache_dir", str(root / "regions")]
    common = [*regions, "--aria_warmup_steps", "2", "--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "2"]
    interrupted, uninterrupted = root / "interrupted", root / "uninterrupted"
    run(sdxl_command(sdxl_assets, interrupted, *common, steps=4))
    resumed = run(sdxl_command(sdxl_assets, interrupted, *common, "--resume_from_checkpoint", "latest", steps=6))
    run(sdxl_command(sdxl_assets, uninterrupted, *common, steps=6))
    rc = root / "rc"
    run(sdxl_command(sdxl_assets, rc, "--validation_prompts", "a violin on a stage", "--validation_steps", "2",
                     "--validation_inference_steps", "2", "--eval_prompt_file", sdxl_assets["prompts"], "--eval_steps",
                     "2", "--eval_max_prompts", "4", "--eval_num_timesteps", "2", "--report_to", "tensorboard",
                     sampling="random", steps=2, student="koala_1b"))
    lora = root / "lora"
    run(sdxl_command(sdxl_assets, lora, "--use_lora", "--lora_rank", "4", sampling="random", steps=2))
    return {"interrupted": interrupted, "uninterrupted": uninterrupted, "resumed_log": resumed.stderr, "rc": rc,
            "lora": lora, "regions": root / "regions"}


def test_sdxl_aria_resume_is_bit_identical(sdxl_runs):
    assert "Resuming from" in sdxl_runs["resumed_log"] and "checkpoint-4" in sdxl_runs["resumed_log"]
    resumed = load_file(str(sdxl_runs["interrupted"] / UNET_WEIGHTS))
    straight = load_file(str(sdxl_runs["uninterrupted"] / UNET_WEIGHTS))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in resumed)
    state_resumed = json.load(open(sdxl_runs["interrupted"] / "checkpoint-6" / "training_state.json"))
    state_straight = json.load(open(sdxl_runs["uninterrupted"] / "checkpoint-6" / "training_state.json"))
    assert state_resumed["tracker"] == state_straight["tracker"] and state_resumed["tracker"]["num_steps"] == 6


def test_sdxl_training_changed_the_koala_student(sdxl_runs, sdxl_assets):
    from diffusers import UNet2DConditionModel

    from aria_utils.families.unet_students import build_student

    initial = build_student(UNet2DConditionModel.from_pretrained(sdxl_assets["teacher"], subfolder="unet"),
                            "koala_700m")
    trained = load_file(str(sdxl_runs["uninterrupted"] / UNET_WEIGHTS))
    assert trained.keys() == initial.state_dict().keys()
    assert any(not torch.equal(trained[key], value) for key, value in initial.state_dict().items())
    report = json.load(open(sdxl_runs["uninterrupted"] / "aria_regions.json"))
    assert report["num_regions"] == 4 and sum(region["visits"] for region in report["regions"]) > 0


@pytest.mark.parametrize("run_name, variant", [("interrupted", "koala_700m"), ("rc", "koala_1b")])
def test_sdxl_output_loads_and_generates(sdxl_runs, run_name, variant):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(sdxl_runs[run_name]))
    assert (pipeline.unet.mid_block is not None) == (variant == "koala_1b")
    assert list(pipeline.unet.config.transformer_layers_per_block) == ([1, 2, 6] if variant == "koala_1b" else [1, 2, 5])
    images = pipeline("a violin on a stage", num_inference_steps=2, output_type="np",
                      generator=torch.manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    card = (sdxl_runs[run_name] / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and f"KOALA `{variant}`" in card
    assert "stable-diffusion-xl" in card and "license: openrail++" in card


def test_sdxl_validation_and_evaluation_ran(sdxl_runs):
    assert (sdxl_runs["rc"] / "validation" / "step-2.png").is_file()
    history = [json.loads(line) for line in open(sdxl_runs["rc"] / "eval" / "history.jsonl")]
    assert [record["step"] for record in history] == [2] and history[0]["mean"] > 0


def test_sdxl_region_aware_evaluation_cli(sdxl_runs, sdxl_assets, tmp_path):
    from aria_utils.evaluate import parse_args, run_evaluation

    report = run_evaluation(parse_args([
        "--teacher", sdxl_assets["teacher"], "--student", f"koala={sdxl_runs['interrupted']}",
        "--student", f"teacher={sdxl_assets['teacher']}", "--prompt_file", sdxl_assets["prompts"],
        "--max_prompts", "8", "--region_cache_dir", str(sdxl_runs["regions"]), "--num_timesteps", "2",
        "--num_inference_steps", "2", "--num_sample_prompts_per_region", "1", "--output_dir", str(tmp_path / "eval")]))
    # The teacher against itself is exactly zero; the trained KOALA student is not.
    assert report["students"]["teacher"]["discrepancy"]["mean"] == 0.0
    assert report["students"]["koala"]["discrepancy"]["mean"] > 0.0


def test_sdxl_lora_output_loads_with_load_lora_weights(sdxl_runs):
    from diffusers import StableDiffusionXLPipeline

    from aria_utils.training.lora import LORA_WEIGHT_NAME

    folder = str(sdxl_runs["lora"])
    assert os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME))

    def generate(pipeline):
        return pipeline("a violin on a stage", num_inference_steps=2, output_type="np",
                        generator=torch.manual_seed(0)).images

    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    base = generate(pipeline)
    pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME)
    adapted = generate(pipeline)
    assert np.isfinite(adapted).all() and not np.array_equal(base, adapted)  # the trained adapter acts


def test_single_file_sdxl_is_recognised_from_its_tensor_names(tmp_path, sdxl_assets, assets):
    from safetensors.torch import save_file

    from aria_utils.families import family_of_single_file
    from aria_utils.families.sdxl import STABLE_DIFFUSION_XL

    def single_file_is_sdxl(path, config=None):
        return family_of_single_file(path, config) is STABLE_DIFFUSION_XL

    sdxl_file, sd_file = tmp_path / "sdxl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.text_projection": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sdxl_file))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd_file))
    assert single_file_is_sdxl(str(sdxl_file)) and not single_file_is_sdxl(str(sd_file))
    # A config folder decides when given: its UNet config names the family.
    assert single_file_is_sdxl(str(sd_file), config=sdxl_assets["teacher"])
    assert not single_file_is_sdxl(str(sdxl_file), config=assets["teacher"])
