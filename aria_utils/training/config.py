"""The training run's settings as small typed configs.

The training script turns its flags into these in one place (`train_aria_distill.configs_from_args`);
every unit below the script takes a config, never the argparse namespace, and the benchmark builds the
same configs to run the same step.
"""

from dataclasses import dataclass

from aria_utils.method.conditioning import REGION_SAMPLING_MODES
from aria_utils.method.region_tracker import RegionTrackerConfig


@dataclass(frozen=True)
class LossWeights:
    """BK-SDM's objective: task (denoising) + output KD + feature KD, each with its weight."""

    task: float
    kd_output: float
    kd_feat: float


@dataclass(frozen=True)
class ConditioningConfig:
    """Which condition each noised latent gets: Random Conditioning's p(t), and where random prompts come from."""

    sampling: str  # paired | random | region_uniform | aria (conditioning.CONDITION_SAMPLING_MODES)
    schedule: str  # p(t) of replacing the caption: exp | linear | constant
    strength: float  # lambda of the exp schedule
    text_drop_prob: float  # empty condition, for classifier-free guidance
    importance_weighting: bool  # ARIA: weight random-condition samples by RC's allocation over ARIA's
    track_regions: bool  # track per-region discrepancy even when the sampling does not use it

    @property
    def draws_random_conditions(self):
        return self.sampling != "paired"

    @property
    def uses_regions(self):
        return self.sampling in REGION_SAMPLING_MODES or self.track_regions


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float
    scale_lr: bool  # multiply the rate by the total batch
    betas: tuple
    weight_decay: float
    epsilon: float
    use_8bit_adam: bool
    max_grad_norm: float

    def learning_rate_for(self, total_batch_size):
        return self.learning_rate * (total_batch_size if self.scale_lr else 1)


@dataclass(frozen=True)
class BatchConfig:
    """What every step's data follows from: batch, accumulation, seed; and the loader's worker count."""

    per_device: int
    gradient_accumulation_steps: int
    seed: int
    num_workers: int = 0


@dataclass(frozen=True)
class RunConfigs:
    """Every config of a run, as the training script builds them from its flags."""

    batch: BatchConfig
    conditioning: ConditioningConfig
    loss_weights: LossWeights
    optimizer: OptimizerConfig
    region_tracker: RegionTrackerConfig
