"""Stable Diffusion XL: two text encoders, pooled text embeddings and image-size micro-conditioning.

Recognised by the UNet config's `addition_embed_type: text_time` (the pooled embedding and six
micro-conditioning numbers are added to the time embedding), or, for a single file, by the second text
encoder's `conditioner.embedders.1.` weights. Students: BK-SDM's layouts and KOALA's (`unet_students.py`).
"""

import torch

from aria_utils.families.base import ModelFamily, PromptEncoderBase, check_encoder_count
from aria_utils.families.unet_students import STUDENT_VARIANTS

ADDITION_EMBED_TYPE = "text_time"
# Only SDXL checkpoints (base and community fine-tunes) carry a second text encoder under this prefix.
SINGLE_FILE_KEY_PREFIX = "conditioner.embedders.1."


def default_time_ids(resolution, batch_size):
    """Micro-conditioning of a generated square image: original size = target size, no crop.

    The six numbers are (original height, original width, crop top, crop left, target height, target
    width), as diffusers' SDXL pipeline builds them when none are given.
    """
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size, dtype=torch.float32)


class StableDiffusionXLPromptEncoder(PromptEncoderBase):
    """As diffusers' SDXL pipeline and training scripts do it: the penultimate hidden states of both encoders,
    concatenated; the second (projecting) encoder's pooled embedding as `text_embeds`; and the per-sample
    micro-conditioning as `time_ids`."""

    uses_time_ids = True

    def __init__(self, family, tokenizers, text_encoders):
        check_encoder_count(tokenizers, text_encoders, 2, "Stable Diffusion XL")
        super().__init__(family, tokenizers, text_encoders)

    def default_time_ids(self, image_size, batch_size):
        return default_time_ids(image_size, batch_size)

    def encode(self, input_ids, time_ids=None):
        if time_ids is None:
            raise ValueError("An SDXL teacher needs each sample's time_ids (original size, crop, target size).")
        hidden_states = []
        for text_encoder, ids in zip(self.text_encoders, input_ids):
            output = text_encoder(ids, output_hidden_states=True, return_dict=True)
            hidden_states.append(output.hidden_states[-2])
        pooled = output.text_embeds  # the second encoder projects its pooled output (CLIPTextModelWithProjection)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
        return torch.cat(hidden_states, dim=-1), added_cond_kwargs


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    # Not AutoModel for the second: it would build a CLIPTextModel and drop the projection the pooled embedding needs.
    text_encoder_folders = (("tokenizer", "text_encoder", None),
                            ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    card_tags = ("stable-diffusion-xl",)
    missing_folders_message = "an SDXL teacher needs both text encoders"
    prompt_encoder_class = StableDiffusionXLPromptEncoder
    student_variants = STUDENT_VARIANTS

    def recognises(self, denoiser_config):
        return dict(denoiser_config).get("addition_embed_type") == ADDITION_EMBED_TYPE

    def recognises_single_file(self, tensor_names):
        return any(name.startswith(SINGLE_FILE_KEY_PREFIX) for name in tensor_names)

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline, {"add_watermarker": False}

    def example_conditioning(self, denoiser_config, batch_size, device, dtype, text_tokens=None):
        states, _ = super().example_conditioning(denoiser_config, batch_size, device, dtype, text_tokens)
        pooled_width = (denoiser_config["projection_class_embeddings_input_dim"]
                        - 6 * denoiser_config["addition_time_embed_dim"])
        return states, {"text_embeds": torch.zeros(batch_size, pooled_width, device=device, dtype=dtype),
                        "time_ids": torch.zeros(batch_size, 6, device=device, dtype=dtype)}

    def generation_micro_conditioning(self, resolution):
        # What SDXL's pipeline conditions on when given only height and width: original = target size, no crop.
        return [resolution, resolution, 0, 0, resolution, resolution]

    def license(self, denoiser_config):
        return "openrail++"


STABLE_DIFFUSION_XL = StableDiffusionXL()
