import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from aria_utils.training.losses import FeatureRecorder
from aria_utils.families.unet_students import (
    BK_VARIANTS,
    build_student,
    count_parameters,
    feature_layer_pairs,
    student_config_from_teacher,
    student_to_teacher_key_map,
)

# The UNet config of CompVis/stable-diffusion-v1-4 (fields that differ from diffusers' defaults).
SD14_UNET_CONFIG = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2, "sample_size": 64, "in_channels": 4, "out_channels": 4,
}
# SD-2.1: per-stage head dims, linear projections, 1024-wide text states.
SD21_UNET_CONFIG = dict(SD14_UNET_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                        use_linear_projection=True, sample_size=96)

# BK-SDM's published U-Net sizes (billions), reported to two decimals.
PUBLISHED_SIZES = {"bk_base": 0.58, "bk_small": 0.49, "bk_tiny": 0.33}


def empty_unet(config):
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def test_sd14_config_is_the_real_teacher():
    assert count_parameters(empty_unet(SD14_UNET_CONFIG)) == 859_520_964  # SD-1.4's well-known U-Net size


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_student_sizes_match_bk_sdm(variant):
    student = empty_unet(student_config_from_teacher(SD14_UNET_CONFIG, variant))
    # Published numbers are rounded to 0.01B; the architectures give 0.579B / 0.482B / 0.323B.
    assert abs(count_parameters(student) / 1e9 - PUBLISHED_SIZES[variant]) <= 0.01


def test_student_layouts():
    base = student_config_from_teacher(SD14_UNET_CONFIG, "bk_base")
    small = student_config_from_teacher(SD14_UNET_CONFIG, "bk_small")
    tiny = student_config_from_teacher(SD14_UNET_CONFIG, "bk_tiny")
    assert base["layers_per_block"] == 1 and base.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    assert small["mid_block_type"] is None
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert tiny["block_out_channels"] == [320, 640, 1280]


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_sd21_students_build_and_map(variant):
    teacher = empty_unet(SD21_UNET_CONFIG)
    config = student_config_from_teacher(SD21_UNET_CONFIG, variant)
    student = empty_unet(config)
    assert student.config.cross_attention_dim == 1024 and student.config.use_linear_projection
    mapping = student_to_teacher_key_map(student, teacher)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for student_key, teacher_key in mapping.items():
        assert teacher_state[teacher_key].shape == student_state[student_key].shape, student_key


def test_unknown_variant_names_the_flag():
    with pytest.raises(ValueError, match="--student_config"):
        student_config_from_teacher(SD14_UNET_CONFIG, "bk_huge")


def test_weight_copy_follows_bk_sdm_mapping(assets):
    teacher = UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet")
    student = build_student(teacher, "bk_tiny")
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    # Down stages keep the first layer.
    assert torch.equal(student_state["down_blocks.0.resnets.0.conv1.weight"],
                       teacher_state["down_blocks.0.resnets.0.conv1.weight"])
    # Up stages keep the outer layers: student layer 1 <- teacher layer 2; tiny shifts stages by one.
    assert torch.equal(student_state["up_blocks.0.resnets.1.conv1.weight"],
                       teacher_state["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(student_state["up_blocks.2.attentions.0.proj_in.weight"],
                       teacher_state["up_blocks.3.attentions.0.proj_in.weight"])
    assert torch.equal(student_state["conv_out.weight"], teacher_state["conv_out.weight"])
    # Every student weight came from somewhere in the teacher.
    assert set(student_to_teacher_key_map(student, teacher).values()) <= set(teacher_state)


@pytest.mark.parametrize("variant", BK_VARIANTS)
def test_feature_pairs_have_matching_shapes(assets, variant):
    teacher = UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet")
    student = build_student(teacher, variant)
    pairs = feature_layer_pairs(student, teacher)
    student_recorder = FeatureRecorder(student, [s for s, _ in pairs])
    teacher_recorder = FeatureRecorder(teacher, [t for _, t in pairs])
    latents, states = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        student(latents, torch.tensor([1, 900]), states)
        teacher(latents, torch.tensor([1, 900]), states)
    for (name, _), s, t in zip(pairs, student_recorder.features(), teacher_recorder.features()):
        assert s.shape == t.shape, name


def test_bk_tiny_feature_pairs_are_bk_sdm_s(assets):
    """BK-SDM's and RC's scripts compare the innermost kept down stage at its last attention's proj_out."""
    teacher = UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet")  # SD-1.x layout
    pairs = dict(feature_layer_pairs(build_student(teacher, "bk_tiny"), teacher))
    assert pairs["down_blocks.2.attentions.0.proj_out"] == "down_blocks.2.attentions.1.proj_out"
    assert "down_blocks.2" not in pairs  # the stage output (after the residual) is not compared
    assert pairs["down_blocks.0"] == "down_blocks.0" and pairs["up_blocks.0"] == "up_blocks.1"


# ------------------------------------------------------------------ Random Conditioning's channel-reduced students
# RC's widths: 0.8 / 0.7 / 0.6 / 0.5 of SD-1.x's 320-640-1280-1280.
RC_WIDTHS = {"c_base": [256, 512, 1024, 1024], "c_small": [224, 448, 896, 896], "c_tiny": [192, 384, 768, 768],
             "c_micro": [160, 320, 640, 640]}


@pytest.mark.parametrize("variant", list(RC_WIDTHS))
def test_channel_reduced_configs_keep_the_layout_and_narrow_every_stage(variant):
    import os
    import re

    config = student_config_from_teacher(SD14_UNET_CONFIG, variant)
    assert config["block_out_channels"] == RC_WIDTHS[variant]
    for key in ("down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim", "attention_head_dim"):
        assert config.get(key) == SD14_UNET_CONFIG.get(key), key
    student = empty_unet(config)
    assert student.mid_block is not None
    millions = f"{count_parameters(student) / 1e6:.1f}M"
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    assert re.search(rf"\| `{variant}` \|[^\n]*{re.escape(millions)}", readme), (variant, millions)


def test_sd2_heads_keep_their_width_where_the_count_does_not_divide():
    config = student_config_from_teacher(SD21_UNET_CONFIG, "c_small")
    widths, heads = config["block_out_channels"], config["attention_head_dim"]
    assert all(width % count == 0 for width, count in zip(widths, heads))
    assert [width // count for width, count in zip(widths, heads)] == [32, 64, 64, 64]  # 224 = 7 heads of 32
    empty_unet(config)  # diffusers builds it


def test_sdxl_teachers_have_no_channel_reduced_students():
    sdxl_like = dict(SD14_UNET_CONFIG, addition_embed_type="text_time")
    with pytest.raises(ValueError, match="koala"):
        student_config_from_teacher(sdxl_like, "c_small")


def test_channel_reduced_students_start_at_random_and_project_rc_layers():
    from aria_utils.families.unet_students import needs_feature_projection
    from aria_utils.training.feature_projectors import FeatureProjectors

    teacher = empty_unet(SD14_UNET_CONFIG)
    student = empty_unet(student_config_from_teacher(SD14_UNET_CONFIG, "c_small"))
    assert needs_feature_projection(student, teacher)
    names = [student_name for student_name, _ in feature_layer_pairs(student, teacher)]
    assert names == ["down_blocks.0.downsamplers.0.conv", "down_blocks.1.downsamplers.0.conv",
                     "down_blocks.2.downsamplers.0.conv", "down_blocks.3.resnets.1.conv2",
                     "mid_block.attentions.0.proj_out", "up_blocks.0.upsamplers.0.conv",
                     "up_blocks.1.upsamplers.0.conv", "up_blocks.2.upsamplers.0.conv",
                     "up_blocks.3.attentions.2.proj_out"]
    with init_empty_weights():
        projectors = FeatureProjectors(student, teacher, feature_layer_pairs(student, teacher))
    shapes = [tuple(projection.weight.shape) for projection in projectors.projections]
    assert shapes[0] == (320, 224, 1, 1) and shapes[3] == (1280, 896, 1, 1) and shapes[-1] == (320, 224, 1, 1)

