"""Paired (latent, caption) data: teacher-generated latents, or real images encoded once by the VAE.

Both end as a `PairedLatents` held in memory: training never touches the VAE or decodes images,
so a step costs only UNet passes.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

LATENTS_FILE = "latents.safetensors"
METADATA_FILE = "metadata.jsonl"
INFO_FILE = "teacher_data.json"


class PairedDataError(ValueError):
    """Bad paired-data input; the message names the flag and the fix."""


@dataclass
class PairedLatents:
    latents: torch.Tensor  # (N, C, h, w), already multiplied by the VAE scaling factor
    captions: list

    def __len__(self):
        return len(self.captions)


def is_teacher_latent_dir(path):
    return path is not None and os.path.isfile(os.path.join(path, LATENTS_FILE))


def save_paired_latents(output_dir, latents, captions, info=None, extra_rows=None):
    os.makedirs(output_dir, exist_ok=True)
    save_file({"latents": latents.contiguous()}, os.path.join(output_dir, LATENTS_FILE))
    with open(os.path.join(output_dir, METADATA_FILE), "w", encoding="utf-8") as handle:
        for index, caption in enumerate(captions):
            row = {"index": index, "caption": caption}
            if extra_rows is not None:
                row.update(extra_rows[index])
            handle.write(json.dumps(row) + "\n")
    if info is not None:
        with open(os.path.join(output_dir, INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)


def load_paired_latents(path):
    latents = load_file(os.path.join(path, LATENTS_FILE))["latents"].float()
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if len(rows) != latents.shape[0]:
        raise PairedDataError(
            f"--train_data_dir {path!r}: {LATENTS_FILE} holds {latents.shape[0]} latents but {METADATA_FILE} "
            f"{len(rows)} captions; regenerate it with aria_utils.generate_teacher_data."
        )
    return PairedLatents(latents=latents, captions=[row["caption"] for row in rows])


def check_image_folder(train_data_dir, caption_column):
    """Cheap early check of an imagefolder: it exists and its metadata.jsonl has the caption column."""
    if not os.path.isdir(train_data_dir):
        raise PairedDataError(f"--train_data_dir {train_data_dir!r} does not exist.")
    metadata = os.path.join(train_data_dir, METADATA_FILE)
    if not os.path.isfile(metadata):
        raise PairedDataError(
            f"--train_data_dir {train_data_dir!r} has neither {LATENTS_FILE} (teacher data, see "
            f"aria_utils.generate_teacher_data) nor {METADATA_FILE} (an imagefolder with captions)."
        )
    with open(metadata, encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    if caption_column not in first:
        raise PairedDataError(
            f"--caption_column {caption_column!r} is not in {metadata}; its columns are {sorted(first)}."
        )


def load_image_caption_dataset(dataset_name=None, dataset_config_name=None, train_data_dir=None,
                               image_column="image", caption_column="text", cache_dir=None, max_train_samples=None):
    import datasets

    if dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    else:
        check_image_folder(train_data_dir, caption_column)
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise PairedDataError(f"{flag} {column!r} is not a column of the dataset; columns: {dataset.column_names}.")
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    return dataset


def _image_to_tensor(image, resolution):
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1] (PIL + numpy, no torchvision)."""
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _caption_text(caption):
    # Datasets sometimes hold several captions per image; take the first, deterministically.
    return caption[0] if isinstance(caption, (list, tuple)) else str(caption)


def dataset_fingerprint(dataset, vae_name, resolution):
    key = json.dumps({"dataset": dataset._fingerprint, "vae": vae_name, "resolution": resolution}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _ImageCaptionRows(torch.utils.data.Dataset):
    """Decoded, resized image tensors and captions; DataLoader workers do the PIL work in parallel."""

    def __init__(self, dataset, image_column, caption_column, resolution):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.resolution = resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        return _image_to_tensor(row[self.image_column], self.resolution), _caption_text(row[self.caption_column])


@torch.no_grad()
def encode_image_dataset(dataset, vae, image_column, caption_column, resolution, batch_size, cache_dir, vae_name,
                         device, dtype, show_progress=True, num_workers=0, seed=0):
    """Encode every image once with the VAE; cached on disk under `cache_dir` by a fingerprint."""
    from tqdm.auto import tqdm

    fingerprint = dataset_fingerprint(dataset, vae_name, resolution)
    cache_path = os.path.join(cache_dir, f"latents-{fingerprint}")
    if is_teacher_latent_dir(cache_path):
        logger.info("Reusing VAE latents cached at %s", cache_path)
        return load_paired_latents(cache_path)
    loader = torch.utils.data.DataLoader(_ImageCaptionRows(dataset, image_column, caption_column, resolution),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)  # the posterior sample is drawn once, reproducibly
    latents, captions = [], []
    for pixels, batch_captions in tqdm(loader, desc="Encoding images", disable=not show_progress):
        posterior = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device=device, dtype=posterior.mean.dtype)
        encoded = posterior.mean + posterior.std * noise
        latents.append((encoded * vae.config.scaling_factor).float().cpu())
        captions.extend(batch_captions)
    latents = torch.cat(latents)
    save_paired_latents(cache_path, latents.half(), captions, info={"vae": vae_name, "resolution": resolution})
    return PairedLatents(latents=latents, captions=captions)
