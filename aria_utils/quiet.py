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
    # The region embedder's own start-up notes: the region index logs what it builds and where.
    "sentence_transformers.base.model": ("No device provided, using", "Loading SentenceTransformer model from"),
    "sentence_transformers.SentenceTransformer": ("No device provided, using", "Load pretrained SentenceTransformer"),
    # Accelerate's account of each file of a checkpoint; the training log names every finished checkpoint once.
    "accelerate.accelerator": ("Saving current state to",),
    "accelerate.checkpointing": ("state saved in", "Random states saved in", "Model weights saved in"),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_harmless_messages():
    """Attach the filters (idempotent); call before the libraries are imported or used.

    Also turns off the libraries' per-file progress bars (transformers' "Loading weights" and "Writing model
    shards", diffusers' "Loading pipeline components"): loading and saving a model takes seconds, and this
    project's own bars show the stages that take long."""
    for name, fragments in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
