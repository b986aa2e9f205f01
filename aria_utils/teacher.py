"""The frozen teacher: its components loaded from a diffusers folder or hub id, one way for every entry point.

The training script, the evaluation CLI and the benchmark all read the same components; the Auto
classes resolve to CLIPTokenizerFast / CLIPTextModel for SD-1.x/2.x checkpoints (and to whatever
text encoder a folder names, e.g. the benchmark's MiniLM). An SDXL teacher (its UNet config has
`addition_embed_type: text_time`) also has `tokenizer_2` / `text_encoder_2`; `PromptEncoder` turns
prompts into what either kind of UNet is conditioned on.
"""

from dataclasses import dataclass

import torch

# SDXL's UNet adds pooled text embeddings and six micro-conditioning numbers to its time embedding.
SDXL_ADDITION_EMBED_TYPE = "text_time"


def is_sdxl_config(unet_config):
    return dict(unet_config).get("addition_embed_type") == SDXL_ADDITION_EMBED_TYPE


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel: the VAE halves the resolution at every stage but the last."""
    return 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)


def default_time_ids(resolution, batch_size):
    """SDXL micro-conditioning of a generated square image: original size = target size, no crop.

    The six numbers are (original height, original width, crop top, crop left, target height, target
    width), as diffusers' SDXL pipeline builds them when none are given.
    """
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size, dtype=torch.float32)


class PromptEncoder:
    """Prompts -> (encoder_hidden_states, added_cond_kwargs) for the teacher's UNet (and so the student's).

    SD-1.x/2.x: the last hidden states of the one text encoder; no added conditions.
    SDXL, as diffusers' SDXL pipeline and training scripts do it: the penultimate hidden states of both
    encoders, concatenated; the second (projecting) encoder's pooled embedding as `text_embeds`; and
    the per-sample micro-conditioning as `time_ids`.
    """

    def __init__(self, tokenizers, text_encoders):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError("PromptEncoder takes one tokenizer per text encoder, one (SD) or two (SDXL).")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)

    @property
    def is_sdxl(self):
        return len(self.text_encoders) == 2

    def tokenize(self, prompts):
        """One LongTensor (batch, max_length) per tokenizer."""
        return tuple(tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids for tokenizer in self.tokenizers)

    def encode(self, input_ids, time_ids=None):
        """Call under torch.no_grad(). `time_ids` (batch, 6) is required for SDXL, ignored otherwise."""
        if not self.is_sdxl:
            return self.text_encoders[0](input_ids[0], return_dict=False)[0], None
        if time_ids is None:
            raise ValueError("An SDXL teacher needs each sample's time_ids (original size, crop, target size).")
        hidden_states = []
        for text_encoder, ids in zip(self.text_encoders, input_ids):
            output = text_encoder(ids, output_hidden_states=True, return_dict=True)
            hidden_states.append(output.hidden_states[-2])
        pooled = output.text_embeds  # the second encoder projects its pooled output (CLIPTextModelWithProjection)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
        return torch.cat(hidden_states, dim=-1), added_cond_kwargs

    def encode_prompts(self, prompts, device, time_ids=None):
        return self.encode(tuple(ids.to(device) for ids in self.tokenize(prompts)), time_ids)

    def pipeline_components(self):
        """The text components under the names a diffusers pipeline takes them."""
        components = {"tokenizer": self.tokenizers[0], "text_encoder": self.text_encoders[0]}
        if self.is_sdxl:
            components.update(tokenizer_2=self.tokenizers[1], text_encoder_2=self.text_encoders[1])
        return components


def pipeline_class(is_sdxl):
    """The diffusers pipeline of a teacher family, and the keyword arguments that keep it offline and quiet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_sdxl:
        return StableDiffusionXLPipeline, {"add_watermarker": False}
    return StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}


def pipeline_class_of(path, **load_kwargs):
    """`pipeline_class` for a pipeline folder or hub id, read from its UNet config (no weights)."""
    from diffusers import UNet2DConditionModel

    config_kwargs = {key: value for key, value in load_kwargs.items() if key in ("revision", "cache_dir")}
    return pipeline_class(is_sdxl_config(UNet2DConditionModel.load_config(path, subfolder="unet", **config_kwargs)))


def build_pipeline(unet, vae, prompt_encoder, scheduler):
    """A pipeline from in-memory components (validation images, evaluation samples)."""
    cls, extra = pipeline_class(prompt_encoder.is_sdxl)
    if not prompt_encoder.is_sdxl:
        extra = dict(extra, feature_extractor=None)
    pipeline = cls(unet=unet, vae=vae, scheduler=scheduler, **prompt_encoder.pipeline_components(), **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class FrozenTeacher:
    tokenizer: object
    noise_scheduler: object
    text_encoder: object
    vae: object
    unet: object
    tokenizer_2: object = None  # SDXL only
    text_encoder_2: object = None

    @property
    def is_sdxl(self):
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self):
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def tokenizers(self):
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    def prompt_encoder(self):
        return PromptEncoder(self.tokenizers, self.text_encoders)


def load_frozen_teacher(path, revision=None, variant=None, cache_dir=None):
    """Tokenizer(s), DDPM scheduler, text encoder(s), VAE and UNet of `path`; the models frozen and in eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    config_kwargs = dict(revision=revision, cache_dir=cache_dir)  # a variant names weight files, not configs
    weight_kwargs = dict(config_kwargs, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weight_kwargs)
    teacher = FrozenTeacher(
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **config_kwargs),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **config_kwargs),
        text_encoder=AutoModel.from_pretrained(path, subfolder="text_encoder", **weight_kwargs),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weight_kwargs),
        unet=unet,
    )
    if is_sdxl_config(unet.config):
        from transformers import CLIPTextModelWithProjection

        # Not AutoModel: it would build a CLIPTextModel and drop the projection the pooled embedding needs.
        teacher.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **config_kwargs)
        teacher.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                             **weight_kwargs)
    for frozen in (*teacher.text_encoders, teacher.vae, teacher.unet):
        frozen.requires_grad_(False)
        frozen.eval()
    return teacher
