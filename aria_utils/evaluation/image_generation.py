"""Images for the image metrics: generated across processes, written as they exist, resumed after a stop.

At the field's scale (MS-COCO 30K prompts, several models) generation takes hours per model, so:

- Work is cut into chunks of `batch_size` consecutive image slots; chunk c belongs to process
  c mod num_processes. Slot j is image j mod images_per_prompt of prompt j // images_per_prompt, and its
  initial noise comes from a CPU generator seeded with seed + j. A chunk's content therefore depends on
  neither the number of processes nor the device, and a 2-process run gives the 1-process run's files.
- Each image is written (atomically) as soon as its batch is done, as `p<prompt index>_s<seed>.png`.
  A chunk whose files all exist is skipped, so a re-run after a kill resumes; a partly written chunk
  is generated again whole, which keeps its batch, and so its numbers, the same.
- `generation.json` in each model's folder records what the images were generated with; a re-run with
  other settings is refused rather than mixing two kinds of image in one set.
- Scoring follows the same chunking: each process extracts Inception features and CLIP cosines of its
  chunks into `features/<settings>/chunk_<start>.safetensors`, which the main process then reduces.
"""

import hashlib
import io
import json
import os
import re

import numpy as np
import torch

from aria_utils.evaluation.image_metrics import MetricSetupError, clip_cosines, inception_features, \
    resize_for_scoring
from aria_utils.files import TEMPORARY_SUFFIX, save_safetensors_atomically, write_bytes_atomically, \
    write_json_atomically

SETTINGS_FILE = "generation.json"
IMAGE_NAME = re.compile(r"^p(\d{7})_s(\d+)\.png$")
SCORING_CHUNK = 256  # images per feature file: few files for 30K images, little lost to a kill
# Which flag sets each recorded generation setting (for the message when a re-run differs).
SETTING_FLAGS = {"model": "--teacher / --student", "prompts_sha256": "--prompt_file / --max_prompts",
                 "num_prompts": "--prompt_file / --max_prompts", "images_per_prompt": "--images_per_prompt",
                 "seed": "--seed", "num_inference_steps": "--image_inference_steps",
                 "guidance_scale": "--guidance_scale", "resolution": "--image_resolution"}


def image_name(prompt_index, seed):
    return f"p{prompt_index:07d}_s{seed}.png"


def prompts_digest(prompts):
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()


class ImageSlots:
    """Slot j: prompt j // images_per_prompt with seed `seed + j`; chunks of `chunk_size` slots."""

    def __init__(self, num_prompts, images_per_prompt, seed):
        self.num_prompts, self.images_per_prompt, self.seed = num_prompts, images_per_prompt, seed
        self.count = num_prompts * images_per_prompt

    def prompt_index(self, slot):
        return slot // self.images_per_prompt

    def file_name(self, slot):
        return image_name(self.prompt_index(slot), self.seed + slot)

    def chunks(self, chunk_size, process_index=0, num_processes=1):
        """This process's chunks, as ranges of slots."""
        for start in range(process_index * chunk_size, self.count, chunk_size * num_processes):
            yield range(start, min(start + chunk_size, self.count))


def check_or_record_settings(folder, settings, is_main_process):
    """Refuse a folder generated with other settings; the main process records them in a new one."""
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        changed = [key for key in settings if recorded.get(key) != settings[key]]
        if changed:
            details = "; ".join(f"{SETTING_FLAGS.get(key, key)}: {recorded.get(key)!r} then, {settings[key]!r} now"
                                for key in changed)
            raise MetricSetupError(
                f"{folder} holds images generated with other settings ({details}). Give the same values to add to "
                "them, or a new --output_dir; images are never mixed across settings.")
    elif is_main_process:
        os.makedirs(folder, exist_ok=True)
        write_json_atomically(path, settings)


def remove_partial_images(folder):
    """Temporary files this generator left when it was killed mid-write (only those: `*.png.tmp`)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".png" + TEMPORARY_SUFFIX):
                os.remove(os.path.join(folder, name))


def count_images(folder):
    return sum(1 for name in os.listdir(folder) if IMAGE_NAME.match(name)) if os.path.isdir(folder) else 0


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def generate_image_set(pipeline, prompts, folder, slots, settings, batch_size, process_index=0, num_processes=1,
                       on_chunk_done=None):
    """Generate this process's missing chunks of `slots` into `folder` (see the module docstring)."""
    for chunk in slots.chunks(batch_size, process_index, num_processes):
        names = [slots.file_name(slot) for slot in chunk]
        if not all(os.path.isfile(os.path.join(folder, name)) for name in names):
            generators = [torch.Generator("cpu").manual_seed(slots.seed + slot) for slot in chunk]
            images = pipeline(prompt=[prompts[slots.prompt_index(slot)] for slot in chunk], generator=generators,
                              num_inference_steps=settings["num_inference_steps"],
                              guidance_scale=settings["guidance_scale"], height=settings["resolution"],
                              width=settings["resolution"], output_type="pil").images
            for name, image in zip(names, images):
                write_bytes_atomically(os.path.join(folder, name), _png_bytes(image))
        if on_chunk_done is not None:
            on_chunk_done()


def scoring_folder(image_folder, scoring_settings):
    """Features of one image set under one scoring setting (resolution, networks) get their own folder."""
    key = hashlib.sha256(json.dumps(scoring_settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(image_folder, "features", key)


def score_image_set(image_folder, slots, prompts, scorers, scoring_settings, batch_size, process_index=0,
                    num_processes=1, on_chunk_done=None):
    """Inception features and/or CLIP cosines of this process's missing scoring chunks.

    `scorers` holds "inception" (the library's network) and/or "clip" ((model, processor)).
    """
    from PIL import Image

    folder = scoring_folder(image_folder, scoring_settings)
    os.makedirs(folder, exist_ok=True)
    if process_index == 0:
        write_json_atomically(os.path.join(folder, "scoring.json"), scoring_settings)
    for chunk in slots.chunks(SCORING_CHUNK, process_index, num_processes):
        path = os.path.join(folder, f"chunk_{chunk.start:08d}.safetensors")
        if not os.path.isfile(path):
            tensors = {"prompt_index": torch.tensor([slots.prompt_index(slot) for slot in chunk]),
                       "seed": torch.tensor([slots.seed + slot for slot in chunk])}
            parts = {"pool": [], "logits": [], "clip": []}
            for start in range(0, len(chunk), batch_size):
                batch = chunk[start : start + batch_size]
                pil_images = []
                for slot in batch:
                    with Image.open(os.path.join(image_folder, slots.file_name(slot))) as image:
                        pil_images.append(image.convert("RGB"))
                pixels = torch.stack([resize_for_scoring(image, scoring_settings["eval_resolution"])
                                      for image in pil_images])
                if "inception" in scorers:
                    pool, logits = inception_features(scorers["inception"], pixels)
                    parts["pool"].append(pool)
                    parts["logits"].append(logits)
                if "clip" in scorers:
                    parts["clip"].append(clip_cosines(*scorers["clip"], pixels,
                                                      [prompts[slots.prompt_index(slot)] for slot in batch]))
            tensors.update({key: torch.cat(values) for key, values in parts.items() if values})
            save_safetensors_atomically(tensors, path)
        if on_chunk_done is not None:
            on_chunk_done()
    return folder


def read_scores(folder, keys):
    """Yield {key: numpy array} per feature chunk, in slot order (one chunk in memory at a time)."""
    from safetensors import safe_open

    for name in sorted(n for n in os.listdir(folder) if n.startswith("chunk_") and n.endswith(".safetensors")):
        with safe_open(os.path.join(folder, name), framework="np") as handle:
            yield {key: np.asarray(handle.get_tensor(key)) for key in keys}
