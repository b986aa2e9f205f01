"""Test support: write a diffusers SD pipeline as one original-layout (LDM) `.safetensors` file.

Community checkpoints are distributed this way (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`). diffusers only ships the opposite direction (`from_single_file`),
so the fixture for "a single-file checkpoint loads as the teacher" needs this renaming. It covers the
SD-1.x layout (UNet2DConditionModel, AutoencoderKL, CLIPTextModel) for any block count and
layers_per_block; the round-trip test checks it against diffusers' own loader.
"""

import re

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_resnet(rest):
    name, parameter = rest.rsplit(".", 1)
    return f"{UNET_RESNET_NAMES[name]}.{parameter}"


def unet_key_to_ldm(key, layers_per_block, up_block_has_attention):
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    per_block = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * per_block + layer
        return f"input_blocks.{index}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_unet_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per_block + layer
        return f"output_blocks.{index}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        # The upsampler follows the resnet (and the attention, when the block has one) of its last layer.
        slot = 2 if up_block_has_attention[block] else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv.{match[2]}"
    raise KeyError(f"No LDM name for UNet parameter {key}")


def vae_key_to_ldm(key, num_up_blocks):
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # LDM numbers decoder stages from the lowest resolution up; diffusers in execution order.
        return (f"decoder.up.{num_up_blocks - 1 - int(match[1])}.block.{match[2]}."
                f"{match[3].replace('conv_shortcut', 'nin_shortcut')}")
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{VAE_ATTENTION_NAMES[match[2]]}.{match[3]}"
    raise KeyError(f"No LDM name for VAE parameter {key}")


def pipeline_to_ldm_state_dict(pipeline):
    unet_config = pipeline.unet.config
    up_has_attention = ["CrossAttn" in name for name in unet_config.up_block_types]
    state = {}
    for key, value in pipeline.unet.state_dict().items():
        state[UNET_PREFIX + unet_key_to_ldm(key, unet_config.layers_per_block, up_has_attention)] = value
    num_up_blocks = len(pipeline.vae.config.up_block_types)
    for key, value in pipeline.vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, num_up_blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        state[VAE_PREFIX + ldm_key] = value
    for key, value in pipeline.text_encoder.state_dict().items():
        # Original checkpoints hold the HF CLIPTextModel layout under text_model.*, which recent
        # transformers versions drop from the state dict.
        state[TEXT_ENCODER_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def save_ldm_single_file(pipeline, path):
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm_state_dict(pipeline), path)
    return path
