"""How a family's teacher noises latents during training: the time axis, the noised input and the target.

Everything downstream (Random Conditioning's p(t), the region tracker's timestep buckets, the evaluation
grid) reads time as `timesteps / num_train_timesteps`, a noise level in [0, 1]:

- `DiscreteNoise` (SD-1.x/2.x, SDXL): integer DDPM timesteps t in [0, T), drawn uniformly;
  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, and the teacher's prediction type gives the target.
- `FlowMatchingNoise` (SD 3.x): t = sigma * T with sigma in [0, 1], as diffusers' flow-matching scheduler
  and SD3 pipeline pass it to the transformer; x_t = (1 - sigma) x0 + sigma eps, target eps - x0 (the
  velocity). Training sigmas are drawn the way diffusers' SD3 training scripts draw them: u from
  `compute_density_for_timestep_sampling` (logit-normal, mode or uniform), then the scheduler's shifted
  table at index u * T; `--weighting_scheme sigma_sqrt` / `cosmap` weight each sample's loss instead.

So for a flow-matching teacher t/T is sigma, and RC's p(t) = exp(-lambda (1 - t/T)) is exactly
p(sigma) = exp(-lambda (1 - sigma)) (docs/method.md section 6).
"""

from dataclasses import dataclass

import torch

FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


@dataclass
class FlowMatchingSampling:
    """--weighting_scheme, --logit_mean, --logit_std, --mode_scale (diffusers' SD3 training-script defaults)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


class DiscreteNoise:
    """DDPM-style training noise of the UNet families."""

    timestep_dtype = torch.long

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type

    def sample_timesteps(self, count, generator):
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator)

    def noisy_latents(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        """What the teacher (and so the student) predicts: the noise, the velocity, or the clean latent (x0)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"Unsupported prediction type {self.prediction_type!r}; use an epsilon, v_prediction or "
                         "sample teacher.")

    def loss_weights(self, timesteps):
        return None


class FlowMatchingNoise:
    """Rectified-flow training noise of SD 3.x (FlowMatchEulerDiscreteScheduler)."""

    timestep_dtype = torch.float32

    def __init__(self, scheduler, sampling=None):
        self.sampling = sampling or FlowMatchingSampling()
        if self.sampling.weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(f"--weighting_scheme {self.sampling.weighting_scheme!r} is unknown; choose one of "
                             f"{', '.join(FLOW_WEIGHTING_SCHEMES)}.")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # The training table: T shifted sigmas from 1 down to about 1/T, times T (the scheduler's own timesteps).
        self.table = scheduler.timesteps.detach().float().cpu().clone()
        if len(self.table) != self.num_train_timesteps:
            raise ValueError("The flow-matching scheduler was passed with inference timesteps set; pass it as loaded.")

    def sample_timesteps(self, count, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sampling = self.sampling
        u = compute_density_for_timestep_sampling(sampling.weighting_scheme, count, logit_mean=sampling.logit_mean,
                                                  logit_std=sampling.logit_std, mode_scale=sampling.mode_scale,
                                                  generator=generator)
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.table[indices]

    def sigmas(self, timesteps, like):
        sigmas = timesteps.to(like.device, torch.float32) / self.num_train_timesteps
        return sigmas.reshape(-1, *([1] * (like.ndim - 1)))

    def noisy_latents(self, latents, noise, timesteps):
        sigmas = self.sigmas(timesteps, latents)
        return ((1.0 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)

    def target(self, latents, noise, timesteps):
        return noise - latents

    def loss_weights(self, timesteps):
        """Per-sample loss weights of --weighting_scheme sigma_sqrt / cosmap (None: all ones)."""
        if self.sampling.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = timesteps.float() / self.num_train_timesteps
        return compute_loss_weighting_for_sd3(self.sampling.weighting_scheme, sigmas).float()
