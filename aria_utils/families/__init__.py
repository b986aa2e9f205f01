"""Model families and how a checkpoint is matched to one.

Registered in `FAMILIES`, most specific first: the first family that recognises a checkpoint owns it.
Adding a family is a new module with a `ModelFamily` object (see `base.py`) and one line here.
"""

import json
import os

from aria_utils.families.base import FrozenTeacher, ModelFamily, vae_scale_factor
from aria_utils.families.sd import STABLE_DIFFUSION
from aria_utils.families.sdxl import STABLE_DIFFUSION_XL

FAMILIES = (STABLE_DIFFUSION_XL, STABLE_DIFFUSION)

__all__ = ["FAMILIES", "FrozenTeacher", "ModelFamily", "family_of_config", "family_of_pipeline",
           "family_of_single_file", "load_frozen_teacher", "vae_scale_factor"]


def family_of_config(denoiser_config):
    """The family of a teacher whose denoiser (UNet) has this config."""
    for family in FAMILIES:
        if family.recognises(denoiser_config):
            return family
    raise ValueError("This denoiser config belongs to no model family this project knows "
                     f"({', '.join(family.name for family in FAMILIES)}).")


def family_of_pipeline(path, revision=None, cache_dir=None, **_weight_kwargs):
    """The family of a pipeline folder or hub id, read from its UNet config (no weights)."""
    from diffusers import UNet2DConditionModel

    return family_of_config(UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision,
                                                             cache_dir=cache_dir))


def family_of_single_file(path, config=None):
    """The family of a single-file checkpoint: from --single_file_config's UNet config when it is a local
    folder, else from the file's tensor names (read from the safetensors header, no weights loaded)."""
    from aria_utils.families.single_file import is_url

    if config is not None and os.path.isfile(os.path.join(config, "unet", "config.json")):
        with open(os.path.join(config, "unet", "config.json"), encoding="utf-8") as handle:
            return family_of_config(json.load(handle))
    if is_url(path) or not os.path.isfile(path):
        return FAMILIES[-1]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        names = list(handle.keys())
    return next(family for family in FAMILIES if family.recognises_single_file(names))


def load_frozen_teacher(path, revision=None, variant=None, cache_dir=None):
    """The teacher's components, loaded the way its family loads them; frozen and in eval mode."""
    family = family_of_pipeline(path, revision=revision, cache_dir=cache_dir)
    return family.load_teacher(path, revision=revision, variant=variant, cache_dir=cache_dir)
