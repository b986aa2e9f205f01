"""Online per-region teacher-student discrepancy tracking and ARIA's allocation rule (docs/method.md section 3).

Per optimisation step, every process turns its samples into a small (regions x timestep-buckets)
table of discrepancy sums and counts; the tables are summed across processes (one all-reduce) and
every process applies the identical update, so all processes hold the same tracker.

The allocation rule turns the tracked discrepancies into the sampling distribution over regions
(always mixed with eps of the base distribution b, and b itself during warm-up):

    level     pi ~ d_k^(1/tau)                                      (docs/method.md 3.3; the default)
    dro       pi ~ q_k,  log q_k <- log q_k + eta * d_k every step  (Group-DRO exponentiated weights)
    progress  pi ~ lp_k^(1/tau),  lp_k = max(0, 1 - d_k / d_slow_k) (learning progress: how fast d_k
              falls, from a fast and a slow EMA, so samples stop going to gaps the student cannot close)

State is plain float64 numpy, serialised to JSON lists: Python floats round-trip exactly, so a
resumed run's tracker is bit-identical to an uninterrupted one.
"""

from dataclasses import dataclass

import numpy as np
import torch

ALLOCATION_RULES = ("level", "dro", "progress")


@dataclass(frozen=True)
class RegionTrackerConfig:
    """The --aria_* flags: how discrepancy is estimated per region and turned into an allocation."""

    base: str  # uniform | corpus: the allocation ARIA's rule tilts
    ema_decay: float
    temperature: float
    uniform_mix: float
    warmup_steps: int
    warmup_min_visits: int
    normalize_timesteps: bool
    timestep_buckets: int
    allocation: str  # one of ALLOCATION_RULES
    dro_step_size: float
    progress_decay: float


class RegionTracker:
    def __init__(
        self,
        num_regions,
        base_probabilities=None,
        ema_decay=0.9,
        temperature=1.0,
        uniform_mix=0.1,
        warmup_steps=0,
        warmup_min_visits=0,
        normalize_timesteps=True,
        num_timestep_buckets=10,
        num_train_timesteps=1000,
        allocation="level",
        dro_step_size=0.01,
        progress_decay=0.99,
    ):
        if num_regions < 1:
            raise ValueError("--num_regions must be at least 1.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"--aria_ema_decay must be in [0, 1), got {ema_decay}.")
        if temperature <= 0:
            raise ValueError(f"--aria_temperature must be > 0, got {temperature}.")
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"--aria_uniform_mix must be in (0, 1] so every region keeps being visited, got {uniform_mix}.")
        if allocation not in ALLOCATION_RULES:
            raise ValueError(f"--aria_allocation {allocation!r} is unknown; use one of {', '.join(ALLOCATION_RULES)}.")
        if not 0.0 <= progress_decay < 1.0:
            raise ValueError(f"--aria_progress_decay must be in [0, 1), got {progress_decay}.")
        self.num_regions = num_regions
        if base_probabilities is None:
            base_probabilities = np.full(num_regions, 1.0 / num_regions)
        base = np.asarray(base_probabilities, dtype=np.float64)
        if base.shape != (num_regions,) or (base < 0).any() or base.sum() <= 0:
            raise ValueError("base_probabilities must be a non-negative vector with one entry per region.")
        self.base = base / base.sum()
        self.ema_decay = float(ema_decay)
        self.temperature = float(temperature)
        self.uniform_mix = float(uniform_mix)
        self.warmup_steps = int(warmup_steps)
        self.warmup_min_visits = int(warmup_min_visits)
        self.normalize_timesteps = bool(normalize_timesteps)
        self.num_buckets = int(num_timestep_buckets) if normalize_timesteps else 1
        self.num_train_timesteps = int(num_train_timesteps)
        self.allocation = allocation
        self.dro_step_size = float(dro_step_size)
        self.progress_decay = float(progress_decay)

        self.ema = np.zeros(num_regions)  # biased EMA of the (normalised) discrepancy
        self.num_updates = np.zeros(num_regions, dtype=np.int64)  # EMA updates per region (bias correction)
        self.visits = np.zeros(num_regions, dtype=np.int64)  # samples seen per region
        self.bucket_ema = np.zeros(self.num_buckets)  # running mean discrepancy per timestep bucket
        self.bucket_updates = np.zeros(self.num_buckets, dtype=np.int64)
        self.num_steps = 0
        self.log_weights = np.zeros(num_regions)  # dro: log q
        self.slow_ema = np.zeros(num_regions)  # progress: a slower EMA of the same discrepancy

    @classmethod
    def from_config(cls, config, sampler, num_train_timesteps):
        """The tracker a `RegionTrackerConfig` describes, over `sampler`'s regions."""
        return cls(
            sampler.num_regions, base_probabilities=sampler.corpus_probabilities if config.base == "corpus" else None,
            ema_decay=config.ema_decay, temperature=config.temperature, uniform_mix=config.uniform_mix,
            warmup_steps=config.warmup_steps, warmup_min_visits=config.warmup_min_visits,
            normalize_timesteps=config.normalize_timesteps, num_timestep_buckets=config.timestep_buckets,
            num_train_timesteps=num_train_timesteps, allocation=config.allocation,
            dro_step_size=config.dro_step_size, progress_decay=config.progress_decay)

    # ----- statistics of one step -----------------------------------------------------------------
    def timestep_buckets(self, timesteps):
        timesteps = torch.as_tensor(timesteps).long()
        return (timesteps * self.num_buckets // self.num_train_timesteps).clamp(0, self.num_buckets - 1)

    def step_statistics(self, region_ids, discrepancies, timesteps=None, device=None):
        """Local (2, regions, buckets) tensor of discrepancy sums and counts. Samples with region -1 are ignored.

        Sum these across processes (and micro-batches) before `update_from_statistics`.
        """
        region_ids = torch.as_tensor(region_ids).long().cpu()
        discrepancies = torch.as_tensor(discrepancies).detach().double().cpu()
        if timesteps is None or self.num_buckets == 1:
            buckets = torch.zeros_like(region_ids)
        else:
            buckets = self.timestep_buckets(torch.as_tensor(timesteps).cpu())
        keep = region_ids >= 0
        flat = region_ids[keep] * self.num_buckets + buckets[keep]
        size = self.num_regions * self.num_buckets
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, discrepancies[keep])
        counts = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, torch.ones_like(discrepancies[keep]))
        stats = torch.stack([sums, counts]).view(2, self.num_regions, self.num_buckets)
        return stats if device is None else stats.to(device)

    def update_from_statistics(self, statistics):
        """Apply one step's (already all-reduced) statistics."""
        stats = torch.as_tensor(statistics).detach().double().cpu().numpy()
        sums, counts = stats[0], stats[1]
        decay = self.ema_decay

        bucket_counts = counts.sum(axis=0)
        bucket_seen = bucket_counts > 0
        if self.num_buckets > 1:
            bucket_means = np.divide(sums.sum(axis=0), bucket_counts, out=np.zeros(self.num_buckets), where=bucket_seen)
            self.bucket_ema[bucket_seen] = decay * self.bucket_ema[bucket_seen] + (1 - decay) * bucket_means[bucket_seen]
            self.bucket_updates[bucket_seen] += 1
            # Divide each bucket by its running mean so that "this region is hard" is not confounded
            # with "this region happened to get high-noise timesteps this step".
            scale = np.ones(self.num_buckets)
            corrected = self.bucket_ema[bucket_seen] / (1 - decay ** self.bucket_updates[bucket_seen])
            scale[bucket_seen] = np.maximum(corrected, 1e-12)
            region_sums = (sums / scale[None, :]).sum(axis=1)
        else:
            region_sums = sums.sum(axis=1)

        region_counts = counts.sum(axis=1)
        seen = region_counts > 0
        batch_means = np.divide(region_sums, region_counts, out=np.zeros(self.num_regions), where=seen)
        self.ema[seen] = decay * self.ema[seen] + (1 - decay) * batch_means[seen]
        slow = self.progress_decay
        self.slow_ema[seen] = slow * self.slow_ema[seen] + (1 - slow) * batch_means[seen]
        self.num_updates[seen] += 1
        self.visits += region_counts.astype(np.int64)
        self.num_steps += 1
        if self.allocation == "dro" and not self.in_warmup():
            self.log_weights += self.dro_step_size * self.estimates()
            self.log_weights -= self.log_weights.max()  # only differences matter; keeps exp() finite

    def update(self, region_ids, discrepancies, timesteps=None):
        """Single-process convenience: statistics of these samples, applied as one step."""
        self.update_from_statistics(self.step_statistics(region_ids, discrepancies, timesteps))

    # ----- estimates and allocation -----------------------------------------------------------------
    def estimates(self):
        """Bias-corrected discrepancy per region; never-visited regions are set to the max of the visited."""
        visited = self.num_updates > 0
        estimates = np.ones(self.num_regions)
        if visited.any():
            estimates[visited] = self.ema[visited] / (1 - self.ema_decay ** self.num_updates[visited])
            estimates[~visited] = estimates[visited].max()
        return estimates

    def learning_progress(self):
        """Per region, the relative fall of the discrepancy: max(0, 1 - fast EMA / slow EMA), bias-corrected."""
        visited = self.num_updates > 0
        progress = np.zeros(self.num_regions)
        fast = self.ema[visited] / (1 - self.ema_decay ** self.num_updates[visited])
        slow = self.slow_ema[visited] / (1 - self.progress_decay ** self.num_updates[visited])
        progress[visited] = np.maximum(0.0, 1.0 - fast / np.maximum(slow, 1e-12))
        if visited.any():
            progress[~visited] = progress[visited].max()  # optimistic for regions not seen yet, as for levels
        return progress

    def in_warmup(self):
        return self.num_steps < self.warmup_steps or self.visits.min() < self.warmup_min_visits

    def probabilities(self):
        """pi = (1 - eps) * rule + eps * base; the base distribution during warm-up."""
        if self.in_warmup():
            return self.base.copy()
        if self.allocation == "dro":
            log_scores = self.log_weights
        else:
            values = self.estimates() if self.allocation == "level" else self.learning_progress()
            if not values.any():  # no region is improving (yet): nothing to prefer
                return self.base.copy()
            log_scores = np.log(np.maximum(values, 1e-12)) / self.temperature
        scores = np.exp(log_scores - log_scores.max())
        return (1 - self.uniform_mix) * scores / scores.sum() + self.uniform_mix * self.base

    # ----- state -----------------------------------------------------------------------------------
    def state_dict(self):
        return {
            "num_regions": self.num_regions,
            "num_buckets": self.num_buckets,
            "ema": self.ema.tolist(),
            "num_updates": self.num_updates.tolist(),
            "visits": self.visits.tolist(),
            "bucket_ema": self.bucket_ema.tolist(),
            "bucket_updates": self.bucket_updates.tolist(),
            "num_steps": self.num_steps,
            "allocation": self.allocation,
            "log_weights": self.log_weights.tolist(),
            "slow_ema": self.slow_ema.tolist(),
        }

    def load_state_dict(self, state):
        if state["num_regions"] != self.num_regions or state["num_buckets"] != self.num_buckets:
            raise ValueError(
                f"Tracker state has {state['num_regions']} regions x {state['num_buckets']} timestep buckets, this run "
                f"{self.num_regions} x {self.num_buckets}: resume with the same --num_regions and --aria_normalize_timesteps."
            )
        self.ema = np.asarray(state["ema"], dtype=np.float64)
        self.num_updates = np.asarray(state["num_updates"], dtype=np.int64)
        self.visits = np.asarray(state["visits"], dtype=np.int64)
        self.bucket_ema = np.asarray(state["bucket_ema"], dtype=np.float64)
        self.bucket_updates = np.asarray(state["bucket_updates"], dtype=np.int64)
        self.num_steps = int(state["num_steps"])
        if state.get("allocation", "level") != self.allocation:
            raise ValueError(f"Tracker state was built with --aria_allocation {state.get('allocation', 'level')}, this "
                             f"run uses {self.allocation}: resume with the same rule.")
        # Checkpoints written before the dro / progress rules existed hold neither: start them at zero.
        self.log_weights = np.asarray(state.get("log_weights", np.zeros(self.num_regions)), dtype=np.float64)
        self.slow_ema = np.asarray(state.get("slow_ema", np.zeros(self.num_regions)), dtype=np.float64)
