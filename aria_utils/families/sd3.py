"""Stable Diffusion 3.x: an MMDiT transformer denoiser, three text encoders and flow-matching noise.

Recognised by its `transformer/` being an `SD3Transformer2DModel` (SD 3 Medium, SD 3.5 Medium / Large and
their fine-tunes), or, for a single file, by the MMDiT's `joint_blocks.` weights. Conditioning as
diffusers' SD3 pipeline builds it: the penultimate hidden states of both CLIP encoders concatenated and
zero-padded to T5's width, followed along the sequence by T5's last hidden states (`--max_sequence_length`
tokens); the two CLIP pooled embeddings concatenated as `pooled_projections`. Training noise:
`noise.FlowMatchingNoise`.

Students: depth-pruned transformers. `depth_1_2` / `depth_1_3` keep a half / a third of the joint blocks,
spread evenly over the depth with the first and last included (TinyFusion and Flux-Mini prune depth the
same way; TinyFusion learns which blocks to keep), each initialised from its teacher block. The last
block keeps the teacher's last (the only one that does not update the text stream), and a kept SD 3.5
Medium dual-attention block stays dual. Feature KD compares each kept block's image-token output with
its teacher block's.

From the published transformer configs (`sd3_configs/`, counted on the meta device, test_sd3_family):
SD 3 Medium 2,028M -> depth_1_2 1,009M / depth_1_3 669M; SD 3.5 Medium 2,243M -> 1,108M / 735M;
SD 3.5 Large 8,057M -> 4,010M / 2,732M.
"""

import json
import os
import re

import torch

from aria_utils.families.base import ModelFamily, PromptEncoderBase, check_encoder_count
from aria_utils.families.unet_students import kept_transformer_blocks

# Only MMDiT checkpoints (SD 3.x) name their blocks so in the original single-file layout.
SINGLE_FILE_KEY_MARKER = "diffusion_model.joint_blocks."
# variant -> the fraction of the teacher's joint blocks kept
DEPTH_VARIANTS = {"depth_1_2": 1 / 2, "depth_1_3": 1 / 3}
# diffusers' SD3 training scripts' default T5 length (the pipeline's own default is 256).
DEFAULT_MAX_SEQUENCE_LENGTH = 77
PUBLISHED_CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "sd3_configs")
# The Stability AI Community License covers SD 3 Medium and SD 3.5 since July 2024.
LICENSE_NAME = "stabilityai-ai-community"


def published_transformer_config(name):
    """The transformer config of a published SD 3.x checkpoint (`sd3_configs/<name>.json`), no weights."""
    with open(os.path.join(PUBLISHED_CONFIGS_DIR, f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


class StableDiffusion3PromptEncoder(PromptEncoderBase):
    """The SD3 pipeline's `encode_prompt`, without classifier-free guidance (one prompt per sample)."""

    def __init__(self, family, tokenizers, text_encoders, max_sequence_length=None):
        check_encoder_count(tokenizers, text_encoders, 3, "Stable Diffusion 3")
        super().__init__(family, tokenizers, text_encoders)
        self.max_sequence_length = int(max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)

    def tokenize(self, prompts):
        lengths = (self.tokenizers[0].model_max_length, self.tokenizers[1].model_max_length, self.max_sequence_length)
        return tuple(tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
                     for tokenizer, length in zip(self.tokenizers, lengths))

    def encode(self, input_ids, time_ids=None):
        clip_states, pooled = [], []
        for text_encoder, ids in zip(self.text_encoders[:2], input_ids[:2]):
            output = text_encoder(ids, output_hidden_states=True, return_dict=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        t5_states = self.text_encoders[2](input_ids[2], return_dict=False)[0]
        clip_states = torch.cat(clip_states, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        encoder_hidden_states = torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2)
        return encoder_hidden_states, {"pooled_projections": torch.cat(pooled, dim=-1)}

    def pipeline_call_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}

    def conditioning_tokens(self):
        return self.tokenizers[0].model_max_length + self.max_sequence_length


def student_config_from_teacher(teacher_config, variant):
    """The depth-pruned student's transformer config for `variant`."""
    if variant not in DEPTH_VARIANTS:
        raise ValueError(f"--student_config {variant!r}: an SD 3.x teacher has depth-pruned students; choose one of "
                         f"{', '.join(DEPTH_VARIANTS)}.")
    config = {key: value for key, value in dict(teacher_config).items() if not key.startswith("_")}
    num_teacher = int(config["num_layers"])
    num_student = max(2, int(num_teacher * DEPTH_VARIANTS[variant] + 0.5))
    kept = kept_transformer_blocks(num_student, num_teacher)
    dual = set(config.get("dual_attention_layers") or ())
    config["num_layers"] = num_student
    config["dual_attention_layers"] = [index for index, block in enumerate(kept) if block in dual]
    return config


_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


def student_to_teacher_key_map(student, teacher):
    """Student weight -> teacher weight: kept block i <- teacher block kept[i]; everything else by name."""
    kept = kept_transformer_blocks(len(student.transformer_blocks), len(teacher.transformer_blocks))
    mapping = {}
    for key in student.state_dict():
        match = _BLOCK_KEY.match(key)
        mapping[key] = f"transformer_blocks.{kept[int(match.group(1))]}.{match.group(2)}" if match else key
    return mapping


def build_student(teacher_transformer, variant):
    from diffusers import SD3Transformer2DModel

    from aria_utils.families.unet_students import copy_mapped_weights

    student = SD3Transformer2DModel.from_config(student_config_from_teacher(teacher_transformer.config, variant))
    return copy_mapped_weights(student, teacher_transformer,
                               student_to_teacher_key_map(student, teacher_transformer))


class StableDiffusion3(ModelFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoder_folders = (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                            ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                            ("tokenizer_3", "text_encoder_3", "T5EncoderModel"))
    card_tags = ("sd3", "stable-diffusion-3")
    missing_folders_message = "an SD 3.x teacher needs its three text encoders (two CLIP, one T5)"
    prompt_encoder_class = StableDiffusion3PromptEncoder
    student_variants = tuple(DEPTH_VARIANTS)
    denoiser_class_name = "SD3Transformer2DModel"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    sampling_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"  # its Euler sampler is already deterministic
    flow_matching = True
    takes_max_sequence_length = True
    denoiser_folder = "transformer"
    denoiser_description = "transformer"
    # The joint attention's image and text projections (diffusers' SD3 LoRA scripts' default set).
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out")

    def recognises(self, denoiser_config):
        return dict(denoiser_config).get("_class_name") == self.denoiser_class_name

    def recognises_single_file(self, tensor_names):
        return any(SINGLE_FILE_KEY_MARKER in name for name in tensor_names)

    def scheduler_problem(self, scheduler_config):
        if scheduler_config.get("_class_name") not in (None, self.scheduler_class_name):
            return (f"an SD 3.x teacher is trained with flow matching, but its scheduler/ is "
                    f"{scheduler_config.get('_class_name')}; use the checkpoint's {self.scheduler_class_name}.")
        return None

    text_tokens = 77 + DEFAULT_MAX_SEQUENCE_LENGTH  # CLIP's 77, then the T5 tokens

    def example_conditioning(self, denoiser_config, batch_size, device, dtype, text_tokens=None):
        states = torch.zeros(batch_size, text_tokens or self.text_tokens, denoiser_config["joint_attention_dim"],
                             device=device, dtype=dtype)
        pooled = torch.zeros(batch_size, denoiser_config["pooled_projection_dim"], device=device, dtype=dtype)
        return states, {"pooled_projections": pooled}

    def denoise(self, model, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs):
        return model(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=added_cond_kwargs["pooled_projections"], return_dict=False)[0]

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline, {}

    def student_config(self, teacher_config, variant):
        return student_config_from_teacher(teacher_config, variant)

    def build_student(self, teacher_denoiser, variant):
        return build_student(teacher_denoiser, variant)

    def student_origin(self, variant):
        return "depth-pruned (TinyFusion / Flux-Mini style)"

    def needs_feature_projection(self, student, teacher):
        return False

    def feature_layer_pairs(self, student, teacher):
        kept = kept_transformer_blocks(len(student.transformer_blocks), len(teacher.transformer_blocks))
        return [(f"transformer_blocks.{index}", f"transformer_blocks.{block}") for index, block in enumerate(kept)]

    def lora_layers(self, denoiser):
        # Transformer LoRA stays in peft's naming, as diffusers' SD3 LoRA scripts save it.
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    @staticmethod
    def feature_output(output):
        # A joint block returns (text stream, image stream); the last block's text stream is None.
        return output[1]

    def license(self, denoiser_config):
        return "other"

    def license_details(self, denoiser_config):
        return {"license_name": LICENSE_NAME,
                "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"}


STABLE_DIFFUSION_3 = StableDiffusion3()
