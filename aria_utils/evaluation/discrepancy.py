"""Region-aware evaluation: where does the student still disagree with its teacher? (docs/method.md section 4)

Two measurements, both with fixed seeds so that two calls give identical numbers:

- Noise-prediction discrepancy. For every held-out prompt the teacher first generates its own latent
  x0 (DDIM, fixed seed): the image the teacher associates with that prompt. x0 is noised with fixed
  noise seeds on a fixed grid of timesteps, and teacher and student predict the noise under the same
  condition; the per-prompt discrepancy is the mean squared difference of the two predictions.
- Sample level. For a subset of prompts the student generates with the same seed, scheduler and
  steps as the teacher's x0: latent MSE, PSNR of the decoded images, and an image grid.

Numbers are reported per region (nearest centroid of the region index), per category, per
timestep, and as mean / worst region / spread across regions.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from aria_utils.cli import UserInputError
from aria_utils.families.base import vae_input_from_latents
from aria_utils.training.preemption import raise_if_preempted, stop_when_preempted


class EvaluationError(UserInputError):
    """Bad evaluation input; the message names the flag and the fix."""


def check_compatible(teacher_unet, student_unet, student_name="student"):
    """Teacher and student must take the same latents and text states. Each is a UNet or its config."""
    teacher_config, student_config = (dict(getattr(unet, "config", unet)) for unet in (teacher_unet, student_unet))
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "joint_attention_dim",
                "pooled_projection_dim", "patch_size"):
        teacher_value, student_value = teacher_config.get(key), student_config.get(key)
        if teacher_value != student_value:
            raise EvaluationError(
                f"--student {student_name}: its UNet has {key}={student_value} but the teacher's is {teacher_value}; "
                "a student must share the teacher's latent space and text encoder."
            )


def default_timestep_grid(num_train_timesteps, count):
    """`count` evenly spaced timesteps, centred in their buckets (e.g. 50, 150, ..., 950 for 10)."""
    width = num_train_timesteps / count
    return [int(width * (i + 0.5)) for i in range(count)]


@dataclass
class EvaluationSetup:
    """What every student is evaluated on: the same prompts, seeds, timesteps and teacher references."""

    prompts: list
    region_ids: np.ndarray
    categories: list = None
    noise_seeds: tuple = (0,)
    timesteps: tuple = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
    num_inference_steps: int = 10
    guidance_scale: float = 7.5
    batch_size: int = 16
    seed: int = 0
    teacher_latents: dict = field(default_factory=dict)  # noise seed -> (N, C, h, w) teacher samples
    # Keep the teacher's noise predictions between calls (one model run per student instead of two).
    # Memory grows with prompts x seeds x timesteps x latent size: for small grids, e.g. the benchmark.
    cache_teacher_predictions: bool = False
    teacher_predictions: dict = field(default_factory=dict)  # (start, seed index, time index) -> prediction


def initial_noise_seed(seed, noise_seed, position):
    """The seed of a prompt's initial noise: depends on its position only, not on its batch."""
    return seed * 7_919 + noise_seed * 104_729 + int(position)


class DiscrepancyEvaluator:
    """Holds the frozen teacher parts; evaluates any number of student UNets against the teacher."""

    def __init__(self, teacher_unet, prompt_encoder, scheduler, vae, device, dtype=torch.float32,
                 show_progress=True):
        self.teacher_unet = teacher_unet
        self.prompt_encoder = prompt_encoder
        self.family = prompt_encoder.family
        self.noise = self.family.training_noise(scheduler)  # only its noising is used: the timesteps are a grid
        self.sampling_scheduler = self.family.sampling_scheduler(scheduler.config)
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.show_progress = show_progress
        self.latent_size = teacher_unet.config.sample_size
        # The image size the references are generated at (SDXL's micro-conditioning names it).
        from aria_utils.families import vae_scale_factor

        self.resolution = self.latent_size * vae_scale_factor(vae.config)

    # ----- helpers ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts):
        """(encoder hidden states, added_cond_kwargs or None) in the evaluation dtype."""
        states, added = self.prompt_encoder.encode_prompts(list(prompts), self.device, image_size=self.resolution)
        if added is not None:
            added = {name: value.to(self.dtype) for name, value in added.items()}
        return states.to(self.dtype), added

    def _pipeline(self, unet):
        return self.prompt_encoder.family.build_pipeline(unet, self.vae, self.prompt_encoder, self.sampling_scheduler)

    def _batches(self, count, batch_size, description):
        """Batch starts with a progress bar; a preemption stops the evaluation at the next batch."""
        from tqdm.auto import tqdm

        for start in tqdm(range(0, count, batch_size), desc=description, disable=not self.show_progress, leave=False):
            raise_if_preempted()
            yield start

    @torch.no_grad()
    def generate_latents(self, unet, prompts, positions, noise_seed, setup, description="Sampling"):
        """Latents the model generates; the initial noise of a prompt depends only on its position."""
        pipeline = self._pipeline(unet)
        shape = (unet.config.in_channels, self.latent_size, self.latent_size)
        outputs = []
        for start in self._batches(len(prompts), setup.batch_size, description):
            batch_positions = positions[start : start + setup.batch_size]
            initial = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(
                    initial_noise_seed(setup.seed, noise_seed, position)))
                for position in batch_positions
            ]).to(self.device, self.dtype)
            result = pipeline(list(prompts[start : start + setup.batch_size]),
                              num_inference_steps=setup.num_inference_steps, guidance_scale=setup.guidance_scale,
                              latents=initial, output_type="latent", callback_on_step_end=stop_when_preempted,
                              **self.prompt_encoder.pipeline_call_kwargs())
            outputs.append(result.images.float().cpu())
        return torch.cat(outputs)

    def prepare(self, setup):
        """Generate the teacher references once; shared by every student evaluated on this setup."""
        for noise_seed in setup.noise_seeds:
            if noise_seed not in setup.teacher_latents:
                setup.teacher_latents[noise_seed] = self.generate_latents(
                    self.teacher_unet, setup.prompts, list(range(len(setup.prompts))), noise_seed, setup,
                    description="Teacher references")
        return setup

    # ----- noise-prediction discrepancy ------------------------------------------------------------
    @torch.no_grad()
    def noise_discrepancy(self, student_unet, setup):
        """(num_prompts, num_seeds, num_timesteps) mean squared teacher-student noise-prediction gap."""
        self.prepare(setup)
        num_prompts = len(setup.prompts)
        result = torch.zeros(num_prompts, len(setup.noise_seeds), len(setup.timesteps), dtype=torch.float64)
        for start in self._batches(num_prompts, setup.batch_size, "Noise-prediction discrepancy"):
            stop = min(start + setup.batch_size, num_prompts)
            states, added_cond_kwargs = self.encode_prompts(setup.prompts[start:stop])
            for seed_index, noise_seed in enumerate(setup.noise_seeds):
                x0 = setup.teacher_latents[noise_seed][start:stop].to(self.device)
                for time_index, timestep in enumerate(setup.timesteps):
                    generator = torch.Generator().manual_seed(noise_seed * 1_000_003 + timestep * 1_009 + start)
                    noise = torch.randn(x0.shape, generator=generator).to(self.device)
                    t = torch.full((stop - start,), timestep, device=self.device, dtype=self.noise.timestep_dtype)
                    noisy = self.noise.noisy_latents(x0, noise, t).to(self.dtype)
                    key = (start, seed_index, time_index)
                    teacher = setup.teacher_predictions.get(key)
                    if teacher is None:
                        teacher = self.family.denoise(self.teacher_unet, noisy, t, states, added_cond_kwargs).float()
                        if setup.cache_teacher_predictions:
                            setup.teacher_predictions[key] = teacher
                    student = self.family.denoise(student_unet, noisy, t, states, added_cond_kwargs).float()
                    result[start:stop, seed_index, time_index] = (teacher - student).pow(2).flatten(1).mean(1).double().cpu()
        return result.numpy()

    # ----- sample level ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents):
        images = []
        for start in range(0, len(latents), 8):
            batch = vae_input_from_latents(latents[start : start + 8].to(self.device, self.dtype), self.vae.config)
            images.append((self.vae.decode(batch).sample.float().clamp(-1, 1).cpu() + 1) / 2)
        return torch.cat(images)

    @torch.no_grad()
    def sample_comparison(self, student_unet, setup, prompt_indices, teacher_samples=None):
        """Latent MSE and decoded-image PSNR per prompt, plus the decoded images.

        Teacher and student sample the chosen prompts in the same batches from the same initial noise
        (the teacher's x0 seeds), so a student identical to the teacher scores exactly zero.
        Pass `teacher_samples` (from `teacher_samples()`) to reuse them across students.
        """
        if teacher_samples is None:
            teacher_samples = self.teacher_samples(setup, prompt_indices)
        prompts = [setup.prompts[i] for i in prompt_indices]
        student_latents = self.generate_latents(student_unet, prompts, list(prompt_indices), setup.noise_seeds[0],
                                                setup, description="Student samples")
        teacher_latents, teacher_images = teacher_samples
        latent_mse = (teacher_latents - student_latents).pow(2).flatten(1).mean(1)
        student_images = self.decode(student_latents)
        image_mse = (teacher_images - student_images).pow(2).flatten(1).mean(1)
        psnr = 10 * torch.log10(1.0 / image_mse.clamp(min=1e-10))
        return {"latent_mse": latent_mse.double().numpy(), "psnr": psnr.double().numpy(),
                "teacher_images": teacher_images, "student_images": student_images}

    def teacher_samples(self, setup, prompt_indices):
        prompts = [setup.prompts[i] for i in prompt_indices]
        latents = self.generate_latents(self.teacher_unet, prompts, list(prompt_indices), setup.noise_seeds[0], setup,
                                        description="Teacher samples")
        return latents, self.decode(latents)


# ----- aggregation ---------------------------------------------------------------------------------
def summarise_discrepancy(per_sample, setup, num_regions):
    """Aggregate a (prompts, seeds, timesteps) array per region / category / timestep and overall."""
    per_prompt = per_sample.mean(axis=(1, 2))
    regions = {}
    for region in range(num_regions):
        members = setup.region_ids == region
        if members.any():
            regions[region] = {"mean": float(per_prompt[members].mean()), "num_prompts": int(members.sum())}
    region_means = np.array([value["mean"] for value in regions.values()])
    worst = max(regions, key=lambda k: regions[k]["mean"])
    summary = {
        "mean": float(per_prompt.mean()),
        "worst_region": int(worst),
        "worst_region_mean": float(regions[worst]["mean"]),
        "region_spread_std": float(region_means.std()),
        "region_spread_range": float(region_means.max() - region_means.min()),
        "per_region": regions,
        "per_timestep": {int(t): float(per_sample[:, :, i].mean()) for i, t in enumerate(setup.timesteps)},
    }
    if setup.categories is not None:
        categories = np.asarray(setup.categories)
        summary["per_category"] = {
            str(c): float(per_prompt[categories == c].mean()) for c in sorted(set(setup.categories))
        }
    return summary


def region_labels(num_regions, corpus_sizes, paired_region_ids=None, underrepresented_fraction=0.02):
    """Per region, the groups it belongs to: seen / unseen (paired set) and underrepresented (corpus)."""
    total = max(int(np.sum(corpus_sizes)), 1)
    paired_counts = None if paired_region_ids is None else np.bincount(
        np.asarray(paired_region_ids)[np.asarray(paired_region_ids) >= 0], minlength=num_regions)
    labels = {}
    for region in range(num_regions):
        groups = []
        if paired_counts is not None:
            groups.append("seen" if paired_counts[region] > 0 else "unseen")
        if corpus_sizes[region] / total < underrepresented_fraction:
            groups.append("underrepresented")
        labels[region] = groups
    return labels


def group_means(per_region, labels):
    groups = {}
    for region, value in per_region.items():
        for group in labels.get(region, []):
            groups.setdefault(group, []).append(value["mean"])
    return {group: float(np.mean(values)) for group, values in groups.items()}


def finite_psnr(value, cap=100.0):
    """PSNR of identical images is infinite; cap it so JSON stays valid."""
    return float(value) if math.isfinite(value) else cap


class PeriodicEvaluation:
    """The noise-prediction part of the evaluation, run from the training loop every --eval_steps.

    Teacher references are generated on the first call and reused. Main process only; no collectives.
    """

    def __init__(self, teacher_unet, prompt_encoder, scheduler, vae, prompts, region_ids, num_regions,
                 num_timesteps, seed, device, dtype, batch_size, output_dir, region_names=None):
        self.evaluator = DiscrepancyEvaluator(teacher_unet, prompt_encoder, scheduler, vae, device, dtype,
                                              show_progress=False)
        self.setup = EvaluationSetup(
            prompts=list(prompts), region_ids=np.asarray(region_ids), seed=seed, batch_size=batch_size,
            timesteps=tuple(default_timestep_grid(scheduler.config.num_train_timesteps, num_timesteps)),
            num_inference_steps=10)
        self.num_regions = num_regions
        self.output_dir = output_dir
        self.region_names = region_names

    def run(self, student_unet, step):
        import os

        from aria_utils.plots import region_bar_chart

        was_training = student_unet.training
        student_unet.eval()
        summary = summarise_discrepancy(self.evaluator.noise_discrepancy(student_unet, self.setup), self.setup,
                                        self.num_regions)
        student_unet.train(was_training)
        logs = {"eval/discrepancy_mean": summary["mean"], "eval/discrepancy_worst_region": summary["worst_region_mean"],
                "eval/discrepancy_region_std": summary["region_spread_std"]}
        for region, value in summary["per_region"].items():
            logs[f"eval/discrepancy/region_{region:02d}"] = value["mean"]
        means = {region: value["mean"] for region, value in summary["per_region"].items()}
        os.makedirs(os.path.join(self.output_dir, "eval"), exist_ok=True)
        self._append_history(os.path.join(self.output_dir, "eval", "history.jsonl"), step, summary)
        image = region_bar_chart(means, f"held-out discrepancy, step {step}",
                                 os.path.join(self.output_dir, "eval", f"step-{step}.png"), self.region_names)
        return logs, image

    @staticmethod
    def _append_history(path, step, summary):
        import json

        record = {"step": step, "mean": summary["mean"], "worst_region_mean": summary["worst_region_mean"],
                  "per_region": {str(k): v["mean"] for k, v in summary["per_region"].items()}}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
