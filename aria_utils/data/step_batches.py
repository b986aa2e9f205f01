"""One training micro-batch, assembled in two halves.

1. `PairedMicroBatches` (a map-style Dataset run by DataLoader workers, ahead of the GPU): which
   paired latents (a seeded per-epoch permutation, sharded across processes), their float32 values
   read from the memory-mapped shards, their SDXL micro-conditioning, the noise, the timesteps, and
   the two uniforms per sample that decide caption replacement and text drop. None of it depends on
   the model or the tracker.
2. `ConditionAssembler` (in the training loop, once the tracker holds step s-1): ARIA's region
   distribution for step s is only known then, so the regions and prompts of the replaced samples
   are drawn here (O(batch), microseconds), and all prompts are tokenised.

Item m of the dataset is micro-batch m of this process since step 0, and both halves draw from
generators seeded by (seed, step, micro-step, process), so the batch of step s is a pure function of
those, whatever the number of workers, and a resumed run replays exactly what an uninterrupted one
would have seen.
"""

from dataclasses import dataclass

import numpy as np
import torch

from aria_utils.method.conditioning import (
    CONDITION_STREAM,
    DATA_STREAM,
    ConditionBatch,
    choose_conditions,
    condition_draws,
    paired_batch_indices,
    step_generator,
)
from aria_utils.data.paired_data import PairedDataError


class PairedMicroBatches(torch.utils.data.Dataset):
    """Item `micro_index`: the tracker-independent half of that micro-batch of this process."""

    def __init__(self, paired, batch_size, gradient_accumulation_steps, process_index, num_processes, seed,
                 noise, caption_region_ids, num_micro_batches, default_time_ids=None):
        self.paired = paired
        self.batch_size = batch_size
        self.accumulation = gradient_accumulation_steps
        self.process_index, self.num_processes = process_index, num_processes
        self.seed = seed
        self.noise = noise  # draws each sample's timestep (families/noise.py)
        self.caption_region_ids = np.asarray(caption_region_ids, dtype=np.int64)
        self.num_micro_batches = num_micro_batches
        # Micro-conditioning of latents whose set stores none (generated images: original = target size).
        self.default_time_ids = torch.as_tensor(default_time_ids if default_time_ids is not None else [0] * 6,
                                                dtype=torch.float32).reshape(6)

    def __len__(self):
        return self.num_micro_batches

    def __getitem__(self, micro_index):
        step, micro_step = divmod(int(micro_index), self.accumulation)
        indices = paired_batch_indices(len(self.paired), self.batch_size, micro_index, self.process_index,
                                       self.num_processes, self.seed)
        generator = step_generator(self.seed, step, micro_step, self.process_index, DATA_STREAM)
        try:
            latents = self.paired.latents(indices)
        except PairedDataError as error:
            # Raised here it would reach the loop wrapped in a DataLoader traceback, and on one process
            # only: the step reports it, and every process stops together (see DistillationStep).
            return {"micro_index": int(micro_index), "data_problem": str(error)}
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = self.noise.sample_timesteps(len(indices), generator)
        replace_draw, drop_draw = condition_draws(len(indices), generator)
        time_ids = self.paired.time_ids(indices)
        if time_ids is None:
            time_ids = self.default_time_ids.expand(len(indices), 6).clone()
        return {"micro_index": int(micro_index), "latents": latents, "noise": noise, "timesteps": timesteps,
                "time_ids": time_ids,
                "replace_draw": replace_draw, "drop_draw": drop_draw,
                "captions": self.paired.captions.take(indices),
                "caption_region_ids": torch.from_numpy(self.caption_region_ids[indices])}


def _ignore_stop_signals(worker_id):
    """Workers leave stopping to the training process: a launcher that signals the whole process tree
    (accelerate's does) would otherwise kill them mid-step, and the DataLoader would then abort the
    very step whose checkpoint the signal asked for. They end when the training process does."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def micro_batch_loader(dataset, first_micro_index, num_workers=0, pin_memory=False):
    """Iterate micro-batches from `first_micro_index` (a resumed run starts mid-stream) to the end."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first_micro_index, len(dataset)), num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (batch, C, h, w) float32, on the device
    noise: torch.Tensor
    timesteps: torch.Tensor
    conditions: ConditionBatch  # prompts, paired flags, region ids, importance weights (CPU)
    input_ids: tuple  # the tokenised prompts, one tensor per tokenizer of the teacher, on the device
    time_ids: torch.Tensor  # (batch, 6) SDXL micro-conditioning on the device; None for SD-1.x/2.x teachers


class ConditionAssembler:
    """The training-loop half: random conditions from the current region distribution, then token ids."""

    def __init__(self, conditioning, sampler, corpus_prompts, prompt_encoder, seed, process_index,
                 num_train_timesteps):
        self.conditioning, self.sampler, self.corpus_prompts = conditioning, sampler, corpus_prompts
        self.prompt_encoder = prompt_encoder
        self.seed, self.process_index, self.num_train_timesteps = seed, process_index, num_train_timesteps

    def __call__(self, prepared, step, micro_step, region_probabilities, device):
        generator = step_generator(self.seed, step, micro_step, self.process_index, CONDITION_STREAM)
        conditions = choose_conditions(
            prepared["captions"], prepared["caption_region_ids"], prepared["timesteps"], self.num_train_timesteps,
            self.conditioning.sampling, self.sampler, self.corpus_prompts, generator,
            region_probabilities=region_probabilities, schedule=self.conditioning.schedule,
            strength=self.conditioning.strength, text_drop_prob=self.conditioning.text_drop_prob,
            importance_weighting=self.conditioning.importance_weighting,
            draws=(prepared["replace_draw"], prepared["drop_draw"]))
        input_ids = self.prompt_encoder.tokenize(conditions.prompts)
        non_blocking = device.type == "cuda"  # the loader pinned these tensors
        return MicroBatch(
            latents=prepared["latents"].to(device, non_blocking=non_blocking),
            noise=prepared["noise"].to(device, non_blocking=non_blocking),
            timesteps=prepared["timesteps"].to(device, non_blocking=non_blocking),
            conditions=conditions,
            input_ids=tuple(ids.to(device) for ids in input_ids),
            time_ids=(prepared["time_ids"].to(device, non_blocking=non_blocking) if self.prompt_encoder.uses_time_ids
                      else None),
        )
