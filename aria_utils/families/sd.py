"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its last hidden states.

SD-2.x is told from SD-1.x by its linear attention projections (`use_linear_projection`); the two differ
only in licence here. Students: BK-SDM's block-removed UNets (`unet_students.py`).
"""

from aria_utils.families.base import ModelFamily, PromptEncoderBase, check_encoder_count
from aria_utils.families.unet_students import BK_VARIANTS

LICENSES = {"sd-1": "creativeml-openrail-m", "sd-2": "openrail++"}


class StableDiffusionPromptEncoder(PromptEncoderBase):
    """The last hidden states of the one text encoder; no added conditions."""

    def __init__(self, family, tokenizers, text_encoders):
        check_encoder_count(tokenizers, text_encoders, 1, "Stable Diffusion 1.x/2.x")
        super().__init__(family, tokenizers, text_encoders)

    def encode(self, input_ids, time_ids=None):
        return self.text_encoders[0](input_ids[0], return_dict=False)[0], None


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_folders = (("tokenizer", "text_encoder", None),)
    card_tags = ()
    missing_folders_message = "a Stable Diffusion teacher needs its tokenizer and text encoder"
    prompt_encoder_class = StableDiffusionPromptEncoder
    student_variants = BK_VARIANTS

    def recognises(self, denoiser_config):
        # The fallback family: any UNet2DConditionModel without SDXL's added time conditioning.
        return dict(denoiser_config).get("addition_embed_type") is None

    def recognises_single_file(self, tensor_names):
        return True

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}

    def in_memory_pipeline_extras(self, extra):
        return dict(extra, feature_extractor=None)

    def version(self, denoiser_config):
        """sd-1 or sd-2 (SD-2 uses linear attention projections)."""
        return "sd-2" if dict(denoiser_config).get("use_linear_projection") else "sd-1"

    def license(self, denoiser_config):
        return LICENSES[self.version(denoiser_config)]


STABLE_DIFFUSION = StableDiffusion()
