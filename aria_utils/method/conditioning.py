"""Random Conditioning (docs/method.md section 2) and where its random prompts come from (section 3.3).

All four `--condition_sampling` modes share one path: draw a region from a distribution over
regions, then a prompt uniformly inside it. Only the region distribution differs:

    paired          no random conditions at all
    random          corpus mass n_k / N  (= uniform over prompts: RC)
    region_uniform  1 / K
    aria            the tracker's allocation pi

The corpus is held as flat numpy arrays (prompt ids grouped by region + offsets), so a draw is O(1)
and a 1M-prompt corpus needs no per-step Python objects beyond the drawn prompts.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

CONDITION_SAMPLING_MODES = ("paired", "random", "region_uniform", "aria")
# The modes that draw random conditions region by region, and so need the region index.
REGION_SAMPLING_MODES = ("region_uniform", "aria")


def random_conditioning_probability(timesteps, num_train_timesteps, schedule="exp", strength=5.0):
    """p(t): probability that a sample's caption is replaced by a random prompt, growing with noise.

    exp:     p = exp(-strength * (1 - t/T))        (p = 1 at t = T, ~0.08 at T/2 for strength 5)
    sigmoid: p = sigmoid(20 * (t/T - 0.7))
    """
    fraction = torch.as_tensor(timesteps, dtype=torch.float64) / num_train_timesteps
    if schedule == "exp":
        return torch.exp(-strength * (1.0 - fraction))
    if schedule == "sigmoid":
        return torch.sigmoid(20.0 * (fraction - 0.7))
    raise ValueError(f"--random_conditioning_schedule {schedule!r} is unknown; use exp or sigmoid.")


class ConditionSampler:
    """Draws (prompt id, region id) pairs from the condition corpus."""

    def __init__(self, num_prompts, region_labels=None, num_regions=None):
        labels = np.zeros(num_prompts, dtype=np.int64) if region_labels is None else np.asarray(region_labels, np.int64)
        if labels.shape != (num_prompts,):
            raise ValueError("region_labels needs one label per prompt.")
        self.num_regions = int(num_regions if num_regions is not None else labels.max() + 1)
        self.region_sizes = np.bincount(labels, minlength=self.num_regions)
        self.prompt_ids_by_region = np.argsort(labels, kind="stable")
        self.region_offsets = np.concatenate([[0], np.cumsum(self.region_sizes)])
        self.corpus_probabilities = self.region_sizes / self.region_sizes.sum()

    def region_distribution(self, mode, tracker=None):
        if mode == "random":
            return self.corpus_probabilities
        if mode == "region_uniform":
            uniform = (self.region_sizes > 0).astype(np.float64)
            return uniform / uniform.sum()
        if mode == "aria":
            if tracker is None:
                raise ValueError("condition_sampling 'aria' needs a RegionTracker.")
            return tracker.probabilities()
        raise ValueError(f"No random conditions are drawn in mode {mode!r}.")

    def sample(self, count, region_probabilities, generator):
        """Draw `count` prompts: a region from `region_probabilities`, then uniformly inside it."""
        probabilities = torch.as_tensor(np.asarray(region_probabilities, dtype=np.float64))
        regions = torch.multinomial(probabilities, count, replacement=True, generator=generator).numpy()
        position = torch.rand(count, generator=generator, dtype=torch.float64).numpy()
        within = np.minimum((position * self.region_sizes[regions]).astype(np.int64), self.region_sizes[regions] - 1)
        prompt_ids = self.prompt_ids_by_region[self.region_offsets[regions] + within]
        return prompt_ids, regions


@dataclass
class ConditionBatch:
    prompts: list  # the text each sample is conditioned on ("" when dropped for CFG)
    is_paired: torch.Tensor  # bool (batch,): the latent belongs to this condition -> task loss applies
    region_ids: torch.Tensor  # long (batch,): region of the condition, -1 when unknown or dropped
    sample_weights: torch.Tensor  # float (batch,): importance weights (ones unless asked for)


def condition_draws(batch_size, generator):
    """The two uniform draws per sample that decide replacement and text drop (independent of the mode)."""
    replace_draw = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    drop_draw = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return replace_draw, drop_draw


def choose_conditions(
    captions,
    caption_region_ids,
    timesteps,
    num_train_timesteps,
    mode,
    sampler,
    corpus_prompts,
    generator,
    region_probabilities=None,
    schedule="exp",
    strength=5.0,
    text_drop_prob=0.1,
    importance_weighting=False,
    draws=None,
):
    """Decide every sample's condition: its own caption, a random corpus prompt, or "" (CFG drop).

    `draws` are the (replace, drop) uniforms of `condition_draws`, when drawn ahead (by a DataLoader
    worker); `generator` then only picks the regions and prompts of the replaced samples.
    """
    batch_size = len(captions)
    prompts = list(captions)
    region_ids = torch.as_tensor(caption_region_ids, dtype=torch.long).clone()
    is_paired = torch.ones(batch_size, dtype=torch.bool)
    weights = torch.ones(batch_size, dtype=torch.float32)

    # Drawn unconditionally so the stream does not depend on the mode.
    replace_draw, drop_draw = draws if draws is not None else condition_draws(batch_size, generator)
    if mode != "paired":
        p_replace = random_conditioning_probability(timesteps.cpu(), num_train_timesteps, schedule, strength)
        replaced = replace_draw < p_replace
        num_replaced = int(replaced.sum())
        if num_replaced:
            prompt_ids, regions = sampler.sample(num_replaced, region_probabilities, generator)
            for slot, prompt_id in zip(torch.nonzero(replaced).flatten().tolist(), prompt_ids.tolist()):
                prompts[slot] = corpus_prompts[prompt_id]
            region_ids[replaced] = torch.from_numpy(regions)
            is_paired[replaced] = False
            if importance_weighting:
                # w = b_k / pi_k with b = RC's allocation: E_pi[w f] = E_b[f], so the expected
                # gradient over random conditions equals RC's. Not divided by the batch's mean weight:
                # over the few random samples of a micro-batch that self-normalisation is biased
                # back towards the unweighted estimate.
                ratio = sampler.corpus_probabilities[regions] / np.asarray(region_probabilities)[regions]
                weights[replaced] = torch.from_numpy(ratio).float()
    dropped = drop_draw < text_drop_prob
    for slot in torch.nonzero(dropped).flatten().tolist():
        prompts[slot] = ""
    region_ids[dropped] = -1
    return ConditionBatch(prompts=prompts, is_paired=is_paired, region_ids=region_ids, sample_weights=weights)


# Independent random streams of one micro-batch: what a DataLoader worker draws ahead (noise,
# timesteps, replace/drop decisions) and what the training loop draws once the tracker is current
# (the regions and prompts of replaced samples).
DATA_STREAM, CONDITION_STREAM = 0, 1


def step_generator(seed, step, micro_step, process_index, stream=DATA_STREAM):
    """The generator for one stream of one micro-batch of one process.

    Every random choice of a training step comes from here. It is a pure function of (seed, step,
    micro-step, process, stream), so a resumed run replays exactly the stream an uninterrupted run
    would have, and no two processes draw the same conditions.
    """
    mixed = (seed * 1_000_003 + step) * 1_009 + micro_step
    mixed = mixed * 10_007 + process_index
    mixed = mixed * 3 + stream
    generator = torch.Generator()
    generator.manual_seed(mixed % (2**63 - 1))
    return generator


def paired_batch_indices(num_items, batch_size, micro_step_index, process_index, num_processes, seed):
    """Indices of one process's micro-batch: a seeded permutation per epoch, sharded across processes.

    `micro_step_index` counts micro-batches since the start of training, so the data stream position
    is a function of the step and resume neither repeats nor skips a batch.
    """
    global_batch = batch_size * num_processes
    start = micro_step_index * global_batch + process_index * batch_size
    positions = np.arange(start, start + batch_size)
    epochs = positions // num_items
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        indices[mask] = _epoch_permutation(num_items, seed, int(epoch))[positions[mask] % num_items]
    return indices


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_items, seed, epoch):
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).numpy()
