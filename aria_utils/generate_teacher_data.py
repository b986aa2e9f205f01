"""Paired data the way Random Conditioning makes it: the teacher generates latents for a prompt subset.

    python -m aria_utils.generate_teacher_data --pretrained_model_name_or_path T \
        --prompt_file prompts.csv --num_prompts 2000 --output_dir teacher-data
    accelerate launch -m aria_utils.generate_teacher_data ...      # the same, spread over every GPU

RC's set (212K prompts, 25 steps, CFG 7.5) is about 10.6M UNet evaluations, a GPU-day, so the work
is split into shards (`--shard_size` latents each) that the processes share, and each finished shard
is written at once (see aria_utils.data.paired_data for the layout). Re-running the same command resumes:
finished shards are kept and an unfinished one is redone. Each latent's noise comes from a seed
derived from (--seed, the prompt's corpus index), and batches never cross a shard, so the set is the
same whatever the number of processes and interruptions (bit for bit on the same hardware, thread
count and --batch_size). A re-run with other settings into the same folder is refused.

An SDXL teacher (detected from its UNet config) is run with `StableDiffusionXLPipeline`, and each
caption row also stores the sample's micro-conditioning (original size, crop, target size: the
generated size, uncropped), which the student is then trained with.

`--exclude_categories` / `--category_fraction` build RC's unseen-concept setting: whole categories
left out of the paired set (their prompts stay in the condition corpus), or kept only at a fraction.
"""

import argparse
import datetime
import hashlib
import logging
import os

import numpy as np
import torch

from aria_utils.cli import argument_parser, run_cli
from aria_utils.publishing.hub import pretrained_source_problem
from aria_utils.data.paired_data import (
    CHECK_KEYS,
    LATENTS_FILE,
    MANIFEST_FILE,
    PairedDataError,
    check_file,
    finished_shards,
    new_manifest,
    read_manifest,
    remove_partial_files,
    shard_check_of_files,
    shard_files,
    shard_record,
    verify_shard,
    write_manifest,
    write_shard,
)
from aria_utils.data.prompts import PromptCorpusError, load_prompt_corpus
from aria_utils.quiet import silence_known_harmless_messages

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000


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


def sample_seed(seed, corpus_index):
    """The noise seed of one latent: a function of (--seed, its prompt's corpus index) only."""
    digest = hashlib.sha256(f"aria-teacher-latent:{seed}:{corpus_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def parse_category_fractions(values):
    fractions = {}
    for value in values or []:
        name, _, fraction = value.rpartition("=")
        if not name:
            raise argparse.ArgumentTypeError(f"--category_fraction expects NAME=FRACTION, got {value!r}.")
        fractions[name] = float(fraction)
    return fractions


def parse_args(argv=None):
    parser = argument_parser("Generate teacher latents for a subset of prompts (RC's paired set).")
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
    parser.add_argument("--batch_size", type=int, default=8,
                        help="Prompts per pipeline call (throughput only; a batch never crosses a shard).")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="Latents per shard: the unit of work shared by processes and redone after a crash.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--ddp_timeout", type=int, default=7200,
                        help="Seconds a process may wait for the others (at the start and the end).")
    args = parser.parse_args(argv)
    for flag in ("num_prompts", "batch_size", "shard_size", "num_inference_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    args.category_fraction = parse_category_fractions(args.category_fraction)
    return args


def teacher_identity(name):
    """How the teacher is recorded in the manifest: absolute for a local folder, as given for a hub id."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def latent_geometry(args):
    """(latent shape, image resolution) from the teacher's configs alone: no weights are loaded."""
    from diffusers import AutoencoderKL

    from aria_utils.families import DENOISER_FOLDERS, denoiser_config_of_pipeline, vae_scale_factor

    problem = pretrained_source_problem(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path",
                                        ["vae/config.json"], args.revision)
    if problem:
        raise SystemExit(f"error: {problem}")
    kwargs = dict(revision=args.revision)
    try:
        _, unet_config = denoiser_config_of_pipeline(args.pretrained_model_name_or_path, **kwargs)
        vae_config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", **kwargs)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: its denoiser "
                         f"({' or '.join(f'{folder}/' for folder in DENOISER_FOLDERS)}) and vae/ configs could not be "
                         f"read ({type(error).__name__}: {error}).") from None
    scale = vae_scale_factor(vae_config)
    resolution = args.resolution or unet_config["sample_size"] * scale
    if resolution % scale:
        raise SystemExit(f"--resolution {resolution} must be a multiple of the VAE's downsampling factor {scale}.")
    return (unet_config["in_channels"], resolution // scale, resolution // scale), resolution


def generation_settings(args, corpus_sha256, resolution):
    """Everything the latents depend on. A re-run into the same folder must match it exactly."""
    return {
        "teacher": teacher_identity(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "corpus_sha256": corpus_sha256,
        "prompt_column": args.prompt_column,
        "category_column": args.category_column,
        "exclude_categories": sorted(args.exclude_categories),
        "category_fraction": args.category_fraction,
        "num_prompts": args.num_prompts,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": resolution,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "shard_size": args.shard_size,
    }


def settings_differences(old, new):
    return [f"{key} {old.get(key)!r} there, {new.get(key)!r} now" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def check_output_folder(output_dir, settings):
    """'new', 'resume' or 'complete'; raises PairedDataError for anything that would replace other work."""
    if not os.path.exists(output_dir):
        return "new"
    if not os.path.isdir(output_dir):
        raise PairedDataError(f"--output_dir {output_dir!r} is a file; pass a folder for the teacher latents.")
    if os.path.isfile(os.path.join(output_dir, LATENTS_FILE)):
        raise PairedDataError(f"--output_dir {output_dir!r} already holds a finished teacher-latent set (single-file "
                              "layout); it is never replaced: choose a new --output_dir.")
    if not os.path.isfile(os.path.join(output_dir, MANIFEST_FILE)):
        if os.listdir(output_dir):
            raise PairedDataError(f"--output_dir {output_dir!r} holds other files and no {MANIFEST_FILE}; choose a new "
                                  "or empty --output_dir for the teacher latents.")
        return "new"
    manifest = read_manifest(output_dir)
    differences = settings_differences(manifest["settings"], settings)
    if differences:
        raise PairedDataError(
            f"--output_dir {output_dir!r} holds teacher latents made with other settings ({'; '.join(differences)}). "
            "Re-run with the original settings to resume or keep it, or choose a new --output_dir.")
    return "complete" if manifest.get("complete") else "resume"


def verify_finished_shards(output_dir, manifest, state):
    """[(shard index, problem)] of the shards that differ from what was written.

    A complete set is verified whole (re-running the command on it is how a user checks and repairs it;
    every process reads its share, so the set is read once). Resuming an unfinished set only compares its
    finished shards' sizes and headers with their records: they were written atomically moments or hours
    ago, and reading 100s of GB again at every restart of a long generation would cost more than it finds.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    complete = bool(manifest.get("complete"))
    shards = range(len(manifest["shards"])) if complete else finished_shards(output_dir, manifest)
    mine = list(shards)[state.process_index :: state.num_processes]
    damaged = []
    for shard_index in tqdm(mine, desc="Verifying shards", unit="shard", disable=not state.is_main_process or not mine):
        problem = verify_shard(output_dir, manifest, shard_index, read_data=complete)
        if problem:
            damaged.append((shard_index, problem))
    return sorted(gather_object(damaged)) if state.num_processes > 1 else damaged


def remove_shard(output_dir, shard_index):
    """Delete one shard's files (inside the set's own folder), so that it is generated again."""
    latents_path, captions_path = shard_files(output_dir, shard_index)
    for path in (latents_path, captions_path, check_file(output_dir, shard_index)):
        if os.path.isfile(path):
            os.remove(path)


def record_shard_checks(output_dir, manifest):
    """Copy each shard's sizes and checksums into the manifest (shards of sets written before checksums
    existed are checksummed now, after they passed verification)."""
    for shard_index, shard in enumerate(manifest["shards"]):
        record = shard_record(output_dir, manifest, shard_index, prefer_check_file=True)
        if record is None:
            record = shard_check_of_files(output_dir, shard_index)
        shard.update({key: record[key] for key in CHECK_KEYS})


def generate_latent_batch(pipeline, prompts, seeds, args, resolution):
    """The teacher's final latents for `prompts`, each sample's noise from its own seed; float16 on the CPU."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    output = pipeline(list(prompts), num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      height=resolution, width=resolution, generator=generators, output_type="latent")
    return output.images.to("cpu", torch.float16)


def load_teacher_pipeline(args, device):
    from aria_utils.families import family_of_pipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    family = family_of_pipeline(args.pretrained_model_name_or_path, revision=args.revision)
    cls, extra = family.pipeline_class()
    pipeline = cls.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                   dtype=dtype, **extra).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, family


def shard_rows(corpus, indices, start, stop, seed, micro_conditioning=None):
    """Caption rows of latents [start, stop); `micro_conditioning` (SDXL's six time ids) goes into each row."""
    rows = []
    for position in range(start, stop):
        corpus_index = int(indices[position])
        row = {"index": position, "caption": corpus.prompts[corpus_index], "corpus_index": corpus_index,
               "seed": sample_seed(seed, corpus_index)}
        if corpus.categories is not None:
            row["category"] = str(corpus.categories[corpus_index])
        if micro_conditioning is not None:
            row["micro_conditioning"] = list(micro_conditioning)
        rows.append(row)
    return rows


@torch.no_grad()
def main(argv=None):
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    silence_known_harmless_messages()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                         timeout=datetime.timedelta(seconds=args.ddp_timeout))
    if args.mixed_precision == "fp16" and state.device.type == "cpu":
        raise SystemExit("--mixed_precision fp16 needs a GPU; on CPU use bf16 or no.")

    # Every check runs on every process before any of them writes, so all of them stop together.
    try:
        corpus = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column,
                                    category_column=args.category_column)
        indices = select_prompts(corpus, args.num_prompts, args.seed, args.exclude_categories, args.category_fraction)
        latent_shape, resolution = latent_geometry(args)
        settings = generation_settings(args, corpus.prompts.digest(), resolution)
        status = check_output_folder(args.output_dir, settings)
    except (PromptCorpusError, PairedDataError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if status == "new":
            write_manifest(args.output_dir, new_manifest(len(indices), args.shard_size, latent_shape, settings))
        remove_partial_files(args.output_dir)
    state.wait_for_everyone()

    manifest = read_manifest(args.output_dir)
    damaged = verify_finished_shards(args.output_dir, manifest, state)
    if damaged and state.is_main_process:
        for shard_index, problem in damaged:
            logger.warning("Shard %d is damaged (%s): redoing it.", shard_index, problem)
            remove_shard(args.output_dir, shard_index)
            for key in CHECK_KEYS:  # the redone shard's own record replaces the old one
                manifest["shards"][shard_index].pop(key, None)
        manifest["complete"] = False
        write_manifest(args.output_dir, manifest)
    state.wait_for_everyone()
    if status == "complete" and not damaged:
        if state.is_main_process:
            print(f"{args.output_dir} already holds these {len(indices)} teacher latents (every shard verified); "
                  "nothing to do.")
        return
    done = sorted(set(finished_shards(args.output_dir, manifest)) - {index for index, _ in damaged})
    remaining = [index for index in range(len(manifest["shards"])) if index not in set(done)]
    # Remaining shards are dealt out round-robin, so resumed work stays balanced across processes.
    mine = remaining[state.process_index :: state.num_processes]
    if state.is_main_process:
        logger.info("%d of %d shards already done; %d processes share the other %d.", len(done),
                    len(manifest["shards"]), state.num_processes, len(remaining))

    pipeline, family = load_teacher_pipeline(args, state.device) if mine else (None, None)
    # What each row records about its image's size, e.g. SDXL's time ids (original = target size, no crop).
    micro_conditioning = family.generation_micro_conditioning(resolution) if family is not None else None
    remaining_latents = sum(manifest["shards"][index]["num_latents"] for index in remaining)
    # One bar for the whole job: the main process counts its own latents times the number of processes
    # (they work at the same pace on the same kind of device), capped at the total.
    progress = tqdm(total=remaining_latents, desc="Teacher latents (all processes)", unit="latent",
                    disable=not state.is_main_process)
    for shard_index in mine:
        start = shard_index * args.shard_size
        stop = start + manifest["shards"][shard_index]["num_latents"]
        rows = shard_rows(corpus, indices, start, stop, args.seed, micro_conditioning)
        latents = []
        for batch_start in range(0, len(rows), args.batch_size):
            batch = rows[batch_start : batch_start + args.batch_size]
            latents.append(generate_latent_batch(pipeline, [row["caption"] for row in batch],
                                                 [row["seed"] for row in batch], args, resolution))
            progress.update(min(len(batch) * state.num_processes, progress.total - progress.n))
        write_shard(args.output_dir, shard_index, torch.cat(latents), rows)
    state.wait_for_everyone()
    progress.close()

    if state.is_main_process:
        missing = sorted(set(range(len(manifest["shards"]))) - set(finished_shards(args.output_dir, manifest)))
        if missing:
            raise SystemExit(f"Shards {missing[:10]} are missing after generation; re-run the same command.")
        record_shard_checks(args.output_dir, manifest)
        manifest["complete"] = True
        write_manifest(args.output_dir, manifest)
        print(f"Wrote {len(indices)} teacher latents in {len(manifest['shards'])} shards to {args.output_dir}")
    state.wait_for_everyone()


if __name__ == "__main__":
    run_cli(main)
