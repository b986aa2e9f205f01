"""Paired data the way Random Conditioning makes it: the teacher generates latents for a prompt subset.

    python -m aria_utils.generate_teacher_data --pretrained_model_name_or_path T \
        --prompt_file prompts.csv --num_prompts 2000 --output_dir teacher-data

Writes `latents.safetensors` (N x 4 x h x w, the latents the pipeline would decode), `metadata.jsonl`
(caption, seed, category per row) and `teacher_data.json` (how it was made). Pass the folder to
`train_aria_distill.py --train_data_dir`.

`--exclude_categories` / `--category_fraction` build RC's unseen-concept setting: whole categories
left out of the paired set (their prompts stay in the condition corpus), or kept only at a fraction.
"""

import argparse
import logging
import os

import numpy as np
import torch

from aria_utils.paired_data import save_paired_latents
from aria_utils.prompts import load_prompt_corpus

logger = logging.getLogger(__name__)


def select_prompts(corpus, num_prompts, seed, exclude_categories=(), category_fractions=None):
    """Indices of the prompts to generate: a seeded subset honouring excluded / thinned categories."""
    rng = np.random.default_rng(seed)
    candidates = np.arange(len(corpus))
    if exclude_categories or category_fractions:
        if corpus.categories is None:
            raise ValueError("--exclude_categories / --category_fraction need --category_column.")
        categories = np.asarray(corpus.categories)
        unknown = (set(exclude_categories) | set(category_fractions or {})) - set(categories.tolist())
        if unknown:
            raise ValueError(f"Categories {sorted(unknown)} do not occur; known: {sorted(set(categories.tolist()))}.")
        keep = ~np.isin(categories, list(exclude_categories))
        for category, fraction in (category_fractions or {}).items():
            members = np.flatnonzero(categories == category)
            dropped = rng.permutation(members)[int(round(fraction * len(members))):]
            keep[dropped] = False
        candidates = candidates[keep]
    if num_prompts > len(candidates):
        raise ValueError(f"--num_prompts {num_prompts} exceeds the {len(candidates)} eligible prompts.")
    return np.sort(rng.permutation(candidates)[:num_prompts])


def parse_category_fractions(values):
    fractions = {}
    for value in values or []:
        name, _, fraction = value.rpartition("=")
        if not name:
            raise argparse.ArgumentTypeError(f"--category_fraction expects NAME=FRACTION, got {value!r}.")
        fractions[name] = float(fraction)
    return fractions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate teacher latents for a subset of prompts (RC's paired set).")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Teacher pipeline: hub id or folder.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--category_column", default=None, help="Column with a category per prompt (kept in metadata).")
    parser.add_argument("--exclude_categories", nargs="*", default=[], help="Categories left out of the paired set.")
    parser.add_argument("--category_fraction", nargs="*", default=[], metavar="NAME=FRACTION",
                        help="Keep only this fraction of a category's prompts as candidates.")
    parser.add_argument("--num_prompts", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="Image resolution; default: the teacher's.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        parser.error("--num_prompts must be at least 1.")
    args.category_fraction = parse_category_fractions(args.category_fraction)
    return args


@torch.no_grad()
def main(argv=None):
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    corpus = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column,
                                category_column=args.category_column)
    indices = select_prompts(corpus, args.num_prompts, args.seed, args.exclude_categories, args.category_fraction)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if dtype == torch.float16 and device == "cpu":
        raise SystemExit("--mixed_precision fp16 needs a GPU; on CPU use bf16 or no.")
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, dtype=dtype,
        safety_checker=None, requires_safety_checker=False,
    ).to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = args.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    prompts = [corpus.prompts[i] for i in indices]
    latents, rows = [], []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="Teacher latents"):
        batch = prompts[start : start + args.batch_size]
        batch_seed = args.seed * 1_000_003 + start
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        output = pipeline(
            batch, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            height=resolution, width=resolution, generator=generator, output_type="latent",
        )
        latents.append(output.images.float().cpu())
        for offset, prompt_index in enumerate(indices[start : start + args.batch_size]):
            row = {"seed": batch_seed, "corpus_index": int(prompt_index)}
            if corpus.categories is not None:
                row["category"] = corpus.categories[prompt_index]
            rows.append(row)
    info = {
        "teacher": args.pretrained_model_name_or_path,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": resolution,
        "seed": args.seed,
        "prompt_file": os.path.abspath(args.prompt_file),
        "exclude_categories": args.exclude_categories,
        "category_fraction": args.category_fraction,
    }
    # fp16 on disk halves the size of large sets; latents are O(1) in magnitude.
    save_paired_latents(args.output_dir, torch.cat(latents).half(), prompts, info=info, extra_rows=rows)
    print(f"Wrote {len(prompts)} teacher latents to {args.output_dir}")


if __name__ == "__main__":
    main()
