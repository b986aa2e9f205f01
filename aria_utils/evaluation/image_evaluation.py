"""FID, IS and CLIP score of every model's images, overall and per split (seen / unseen /
underrepresented / category; CLIP also per region), the way BK-SDM and RC report them.

Three stages, each resumable, the first two spread over processes (`accelerate launch`):
generate every model's images (`image_generation`), score them (Inception features, CLIP cosines),
and reduce the scores per split on the main process. FID compares each split with the reference:
by default the teacher's images of the same split (how far the student is from what it imitates);
with `--fid_reference` a pytorch-fid `.npz` or a folder of real images, the same reference serves every
split (MS-COCO statistics are of the whole set).
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from aria_utils.evaluation import image_generation as generation
from aria_utils.evaluation import image_metrics as metrics

IMAGE_METRICS = ("fid", "is", "clip")
# Below this many images a split's covariance (2048 x 2048) is singular and FID is biased upwards;
# such numbers compare only with splits of the same size.
FID_MIN_IMAGES = metrics.INCEPTION_FEATURE_SIZE
REFERENCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageMetricsConfig:
    metrics: tuple
    resolution: int
    eval_resolution: int
    num_inference_steps: int
    guidance_scale: float
    images_per_prompt: int
    seed: int
    batch_size: int
    fid_reference: str = "teacher"
    inception_weights: str = None
    clip_model_name_or_path: str = None

    def scoring_settings(self):
        return {"eval_resolution": self.eval_resolution,
                "inception": (weights_identity(self.inception_weights) if self.wants_inception else None),
                "clip": self.clip_model_name_or_path if "clip" in self.metrics else None}

    @property
    def wants_inception(self):
        return "fid" in self.metrics or "is" in self.metrics


def weights_identity(path):
    """A local weights file by name, size and first MiB (cheap; tells two files apart), or the library default."""
    if path is None:
        return "torch-fidelity download (2015-12-05)"
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:16]
    return f"{os.path.basename(path)}:{os.path.getsize(path)}:{head}"


def split_membership(prompt_indices, region_ids, region_groups, categories):
    """{split name: boolean mask over `prompt_indices`}: all, each region group, each category."""
    regions = region_ids[prompt_indices]
    splits = {"all": np.ones(len(prompt_indices), dtype=bool)}
    for group in sorted({g for groups in region_groups.values() for g in groups}):
        members = [region for region, groups in region_groups.items() if group in groups]
        splits[group] = np.isin(regions, members)
    if categories is not None:
        category_of = np.asarray(categories, dtype=object)[prompt_indices]
        for category in sorted(set(categories)):
            splits[f"category: {category}"] = category_of == category
    return splits


class ImageEvaluation:
    """One evaluation's image sets: where they live, and the stages that fill and read them."""

    def __init__(self, config, output_dir, prompts, region_ids, region_groups, categories=None):
        self.config, self.prompts = config, prompts
        self.region_ids, self.region_groups, self.categories = region_ids, region_groups, categories
        self.root = os.path.join(output_dir, "images")
        self.slots = generation.ImageSlots(len(prompts), config.images_per_prompt, config.seed)

    def folder(self, name):
        return os.path.join(self.root, name)

    def generation_settings(self, model_path):
        c = self.config
        return {"model": model_path, "prompts_sha256": generation.prompts_digest(self.prompts),
                "num_prompts": len(self.prompts), "images_per_prompt": c.images_per_prompt, "seed": c.seed,
                "num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                "resolution": c.resolution}

    def check_settings(self, models, is_main_process):
        """Before any work, on every process: refuse a folder generated with other settings. The main process
        also removes what a killed run left half-written (before the others start writing, not while)."""
        for name, path in models.items():
            generation.check_or_record_settings(self.folder(name), self.generation_settings(path), is_main_process)
            if is_main_process:
                generation.remove_partial_images(self.folder(name))

    # ----- stage 1: images --------------------------------------------------------------------------
    def generate(self, teacher_pipeline, models, load_unet, state, denoiser_folder="unet"):
        """Every model's missing images; `models` is {name: path}, `load_unet(path)` gives its denoiser, which the
        pipeline takes as `denoiser_folder` (unet or transformer)."""
        from tqdm.auto import tqdm

        names = list(models)
        total = self.slots.count * len(names)
        bar = tqdm(total=total, desc="Generating images", unit="image", disable=not state.is_main_process,
                   initial=sum(generation.count_images(self.folder(n)) for n in names))
        pipeline_class = type(teacher_pipeline)
        for position, name in enumerate(names):
            folder = self.folder(name)
            if generation.count_images(folder) == self.slots.count:
                continue
            teacher_denoiser = getattr(teacher_pipeline, denoiser_folder)
            unet = teacher_denoiser if models[name] is None else load_unet(models[name])
            pipeline = pipeline_class(**dict(teacher_pipeline.components, **{denoiser_folder: unet.to(
                teacher_pipeline.device, teacher_denoiser.dtype)}))
            pipeline.set_progress_bar_config(disable=True)
            done_before = sum(generation.count_images(self.folder(n)) for n in names[:position])

            def show_progress():
                if state.is_main_process:  # files on disk: every process's progress, not just this one's
                    bar.n = done_before + generation.count_images(folder)
                    bar.refresh()

            generation.generate_image_set(pipeline, self.prompts, folder, self.slots,
                                          self.generation_settings(models[name] or "teacher"),
                                          self.config.batch_size, state.process_index, state.num_processes,
                                          on_chunk_done=show_progress)
        state.wait_for_everyone()
        bar.n = sum(generation.count_images(self.folder(n)) for n in names)
        bar.close()

    # ----- stage 2: scores --------------------------------------------------------------------------
    def load_scorers(self, device):
        scorers = {}
        if self.config.wants_inception:
            scorers["inception"] = metrics.load_inception(self.config.inception_weights, device=device)
        if "clip" in self.config.metrics:
            scorers["clip"] = metrics.load_clip(self.config.clip_model_name_or_path, device)
        return scorers

    @staticmethod
    def move_scorers(scorers, device):
        if "inception" in scorers:
            scorers["inception"].to(device)
        if "clip" in scorers:
            scorers["clip"][0].to(device)

    def score(self, names, scorers, state):
        from tqdm.auto import tqdm

        chunks_per_set = -(-self.slots.count // generation.SCORING_CHUNK)
        bar = tqdm(total=chunks_per_set * len(names), desc="Scoring images", unit="chunk",
                   disable=not state.is_main_process)
        folders = {}
        for name in names:
            folders[name] = generation.score_image_set(
                self.folder(name), self.slots, self.prompts, scorers, self.config.scoring_settings(),
                self.config.batch_size, state.process_index, state.num_processes,
                on_chunk_done=lambda: bar.update(state.num_processes))
        state.wait_for_everyone()
        bar.close()
        return folders

    # ----- stage 3: numbers (main process) ----------------------------------------------------------
    def split_statistics(self, score_folder, splits):
        """{split: FeatureStatistics} from one pass per split over the feature chunks."""
        result = {}
        for split, mask in splits.items():
            statistics, offset = metrics.FeatureStatistics(), 0
            for chunk in generation.read_scores(score_folder, ["pool"]):
                members = mask[offset : offset + len(chunk["pool"])]
                offset += len(chunk["pool"])
                if members.any():
                    statistics.add(torch.from_numpy(chunk["pool"][members]))
            result[split] = statistics
        return result

    def reference_statistics(self, teacher_statistics, scorers):
        """{split: (mean, covariance)} to compare with; None where a split has too few teacher images."""
        reference = self.config.fid_reference
        if reference == "teacher":
            return {split: (s.mean_and_covariance() if s.count >= 2 else None)
                    for split, s in teacher_statistics.items()}
        if reference.endswith(".npz"):
            shared = metrics.load_reference_statistics(reference)
        else:
            shared = self.folder_statistics(reference, scorers["inception"])
        return {split: shared for split in teacher_statistics}

    def folder_statistics(self, folder, network):
        """Statistics of a folder of real images, cached as a pytorch-fid `.npz` next to the report."""
        from PIL import Image
        from tqdm.auto import tqdm

        files = sorted(name for name in os.listdir(folder) if name.lower().endswith(REFERENCE_IMAGE_SUFFIXES))
        key = hashlib.sha256("\n".join(files + [str(self.config.scoring_settings())]).encode()).hexdigest()[:12]
        os.makedirs(self.root, exist_ok=True)
        cache = os.path.join(self.root, f"fid_reference_{key}.npz")
        if os.path.isfile(cache):
            return metrics.load_reference_statistics(cache)
        statistics = metrics.FeatureStatistics()
        for start in tqdm(range(0, len(files), self.config.batch_size), desc="Reference images"):
            batch = []
            for name in files[start : start + self.config.batch_size]:
                with Image.open(os.path.join(folder, name)) as image:
                    batch.append(metrics.resize_for_scoring(image, self.config.eval_resolution))
            statistics.add(metrics.inception_features(network, torch.stack(batch))[0])
        metrics.save_reference_statistics(cache, statistics)
        return statistics.mean_and_covariance()

    def summarise(self, score_folders, teacher_name, scorers):
        """{model: {"splits": {split: numbers}, "clip_per_region": {...}}} for the report."""
        prompt_indices = np.concatenate([c["prompt_index"] for c in
                                         generation.read_scores(score_folders[teacher_name], ["prompt_index"])])
        splits = split_membership(prompt_indices, self.region_ids, self.region_groups, self.categories)
        wants = self.config.metrics
        reference = None
        if "fid" in wants:
            reference = self.reference_statistics(self.split_statistics(score_folders[teacher_name], splits), scorers)
        results = {}
        for name, folder in score_folders.items():
            # The teacher against its own images is the reference (0 by construction): nothing to compute.
            is_reference = name == teacher_name and self.config.fid_reference == "teacher"
            statistics = self.split_statistics(folder, splits) if "fid" in wants and not is_reference else {}
            keys = [key for key, metric in (("logits", "is"), ("clip", "clip")) if metric in wants]
            columns = {key: np.concatenate([c[key] for c in generation.read_scores(folder, keys)]) for key in keys}
            per_split = {}
            for split, mask in splits.items():
                numbers = {"images": int(mask.sum())}
                if "fid" in wants:
                    numbers["fid"] = (metrics.frechet_distance(statistics[split].mean_and_covariance(),
                                                               reference[split])
                                      if not is_reference and statistics[split].count >= 2
                                      and reference[split] is not None else None)
                if "is" in wants and mask.sum() >= 2:
                    numbers["is"], numbers["is_std"] = metrics.inception_score(columns["logits"][mask],
                                                                               seed=self.config.seed)
                if "clip" in wants and mask.any():
                    numbers["clip"] = float(columns["clip"][mask].astype(np.float64).mean())
                if "fid" in wants and numbers["images"] < FID_MIN_IMAGES:
                    numbers["warning"] = f"FID is biased upwards below {FID_MIN_IMAGES} images"
                per_split[split] = numbers
            result = {"splits": per_split}
            if "clip" in wants:
                regions = self.region_ids[prompt_indices]
                result["clip_per_region"] = {str(k): float(columns["clip"][regions == k].astype(np.float64).mean())
                                             for k in sorted(set(regions.tolist()))}
            results[name] = result
        return results
