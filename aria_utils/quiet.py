"""Known-harmless messages of the libraries underneath, dropped so that real warnings stand out.

Each entry names the logger that emits it and a fragment of its text; nothing else from these
loggers is filtered.
"""

import logging

KNOWN_HARMLESS = {
    # bitsandbytes looks for an optional CPU 4-bit kernel on the Hub; we never quantize on the CPU.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Stable Diffusion pipelines import the safety checker's image processors; their PIL fallback is fine here.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # Evaluation and validation pipelines are built without the safety checker on purpose: they measure the model.
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion": ("You have disabled the safety checker",),
    # Casting a model whose list of modules to keep in float32 is empty: there is nothing to keep.
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_harmless_messages():
    """Attach the filters (idempotent); call before the libraries are imported or used."""
    for name, fragments in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(fragments))
