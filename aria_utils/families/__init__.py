"""Model families and how a checkpoint is matched to one.

Registered in `FAMILIES`, most specific first: the first family that recognises a checkpoint owns it.
Adding a family is a new module with a `ModelFamily` object (see `base.py`) and one line here.
"""

import json
import os

from aria_utils.families.base import FrozenTeacher, ModelFamily, vae_scale_factor
from aria_utils.families.sd import STABLE_DIFFUSION
from aria_utils.families.sd3 import STABLE_DIFFUSION_3
from aria_utils.families.sdxl import STABLE_DIFFUSION_XL

FAMILIES = (STABLE_DIFFUSION_3, STABLE_DIFFUSION_XL, STABLE_DIFFUSION)
# Where a pipeline keeps its denoiser, in the order they are looked for.
DENOISER_FOLDERS = ("transformer", "unet")

__all__ = ["DENOISER_FOLDERS", "FAMILIES", "FrozenTeacher", "ModelFamily", "denoiser_config_of_pipeline",
           "denoiser_on_meta_device", "family_of_config", "family_of_pipeline", "family_of_single_file",
           "load_denoiser_config",
           "load_frozen_teacher", "vae_scale_factor"]


def family_of_config(denoiser_config):
    """The family of a teacher whose denoiser (UNet or transformer) has this config."""
    for family in FAMILIES:
        if family.recognises(denoiser_config):
            return family
    raise ValueError("This denoiser config belongs to no model family this project knows "
                     f"({', '.join(family.name for family in FAMILIES)}).")


def denoiser_on_meta_device(denoiser_config, family=None):
    """The denoiser of this config built on the meta device, buffers included: sizes and MACs of full-size models
    without their memory (SD 3.5 Medium's position table alone is 226M numbers). `family`: the config's, when
    known (a derived student config carries no class name)."""
    import torch

    family = family or family_of_config(denoiser_config)
    with torch.device("meta"):
        return family.denoiser_class().from_config(denoiser_config)


def load_denoiser_config(path, subfolder=None, revision=None, cache_dir=None):
    """A denoiser's config.json (any class), from a folder or hub id; no weights."""
    from diffusers.configuration_utils import ConfigMixin

    class AnyDenoiserConfig(ConfigMixin):
        config_name = "config.json"

    return AnyDenoiserConfig.load_config(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)


def denoiser_config_of_pipeline(path, revision=None, cache_dir=None):
    """(family, denoiser config) of a pipeline folder or hub id, read from its transformer/ or unet/ config
    (no weights). Raises OSError when it has neither."""

    if os.path.isdir(path):
        folders = [folder for folder in DENOISER_FOLDERS if os.path.isfile(os.path.join(path, folder, "config.json"))]
        if not folders:
            raise OSError(f"{path} has no {' or '.join(f'{folder}/config.json' for folder in DENOISER_FOLDERS)}.")
    else:
        folders = DENOISER_FOLDERS
    error = None
    for folder in folders:
        try:
            config = load_denoiser_config(path, subfolder=folder, revision=revision, cache_dir=cache_dir)
        except OSError as missing:  # a hub id: the other denoiser folder may be the one it has
            error = missing
            continue
        return family_of_config(config), config
    raise error


def family_of_pipeline(path, revision=None, cache_dir=None, **_weight_kwargs):
    """The family of a pipeline folder or hub id, read from its denoiser's config (no weights)."""
    return denoiser_config_of_pipeline(path, revision=revision, cache_dir=cache_dir)[0]


def family_of_single_file(path, config=None):
    """The family of a single-file checkpoint: from --single_file_config's denoiser config when it is a local
    folder, else from the file's tensor names (read from the safetensors header, no weights loaded)."""
    from aria_utils.families.single_file import is_url

    for folder in DENOISER_FOLDERS:
        if config is not None and os.path.isfile(os.path.join(config, folder, "config.json")):
            with open(os.path.join(config, folder, "config.json"), encoding="utf-8") as handle:
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
