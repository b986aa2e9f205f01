"""The frozen teacher: its components loaded from a diffusers folder or hub id, one way for every entry point.

The training script, the evaluation CLI and the benchmark all read the same five components; the
Auto classes resolve to CLIPTokenizerFast / CLIPTextModel for SD-1.x/2.x checkpoints (and to whatever
text encoder a folder names, e.g. the benchmark's MiniLM).
"""

from dataclasses import dataclass


@dataclass
class FrozenTeacher:
    tokenizer: object
    noise_scheduler: object
    text_encoder: object
    vae: object
    unet: object


def load_frozen_teacher(path, revision=None, variant=None, cache_dir=None):
    """Tokenizer, DDPM scheduler, text encoder, VAE and UNet of `path`; the models frozen and in eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    config_kwargs = dict(revision=revision, cache_dir=cache_dir)  # a variant names weight files, not configs
    weight_kwargs = dict(config_kwargs, variant=variant)
    teacher = FrozenTeacher(
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **config_kwargs),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **config_kwargs),
        text_encoder=AutoModel.from_pretrained(path, subfolder="text_encoder", **weight_kwargs),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weight_kwargs),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weight_kwargs),
    )
    for frozen in (teacher.text_encoder, teacher.vae, teacher.unet):
        frozen.requires_grad_(False)
        frozen.eval()
    return teacher
