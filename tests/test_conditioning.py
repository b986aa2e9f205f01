import math

import numpy as np
import pytest
import torch

from aria_utils.method.conditioning import (
    ConditionSampler,
    choose_conditions,
    paired_batch_indices,
    random_conditioning_probability,
    step_generator,
)


def test_exp_schedule_matches_rc():
    p = random_conditioning_probability(torch.tensor([1000, 500, 0]), 1000, "exp", 5.0)
    assert p[0].item() == pytest.approx(1.0)
    assert p[1].item() == pytest.approx(math.exp(-2.5))  # ~0.08 at T/2
    assert p[2].item() == pytest.approx(math.exp(-5.0))


def test_sigmoid_schedule_is_half_at_point_seven():
    p = random_conditioning_probability(torch.tensor([700, 1000, 0]), 1000, "sigmoid")
    assert p[0].item() == pytest.approx(0.5)
    assert p[1].item() > 0.99 and p[2].item() < 1e-5


@pytest.mark.parametrize("schedule", ["exp", "sigmoid"])
def test_schedules_increase_with_noise(schedule):
    p = random_conditioning_probability(torch.arange(0, 1001), 1000, schedule)
    assert torch.all(p[1:] >= p[:-1]) and p.min() >= 0 and p.max() <= 1


def test_unknown_schedule_names_flag():
    with pytest.raises(ValueError, match="--random_conditioning_schedule"):
        random_conditioning_probability(torch.tensor([1]), 1000, "cosine")


def make_sampler():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    return ConditionSampler(100, labels), [f"prompt {i}" for i in range(100)], labels


def test_paired_mode_never_replaces_captions():
    sampler, corpus, _ = make_sampler()
    captions = [f"caption {i}" for i in range(64)]
    batch = choose_conditions(captions, np.full(64, -1), torch.full((64,), 999), 1000, "paired", sampler, corpus,
                              torch.Generator().manual_seed(0), text_drop_prob=0.0)
    assert batch.prompts == captions and batch.is_paired.all()


def test_replaced_samples_are_unpaired_and_carry_their_region():
    sampler, corpus, labels = make_sampler()
    captions = [f"caption {i}" for i in range(256)]
    timesteps = torch.cat([torch.full((128,), 999), torch.zeros(128, dtype=torch.long)])
    batch = choose_conditions(captions, np.full(256, -1), timesteps, 1000, "random", sampler, corpus,
                              torch.Generator().manual_seed(0), region_probabilities=sampler.corpus_probabilities,
                              text_drop_prob=0.0)
    replaced = ~batch.is_paired
    assert replaced[:128].float().mean() > 0.9  # p(999) ~ 1
    assert replaced[128:].float().mean() < 0.05  # p(0) = exp(-5)
    for slot in torch.nonzero(replaced).flatten().tolist():
        prompt_id = corpus.index(batch.prompts[slot])
        assert batch.region_ids[slot].item() == labels[prompt_id]
    assert all(batch.prompts[i] == captions[i] for i in range(256) if batch.is_paired[i])


def test_text_drop_empties_prompt_and_untracks_it():
    sampler, corpus, _ = make_sampler()
    batch = choose_conditions(["c"] * 1000, np.zeros(1000), torch.zeros(1000, dtype=torch.long), 1000, "paired",
                              sampler, corpus, torch.Generator().manual_seed(1), text_drop_prob=0.1)
    dropped = np.array([p == "" for p in batch.prompts])
    assert 0.07 < dropped.mean() < 0.13
    assert (batch.region_ids[torch.from_numpy(dropped)] == -1).all()


def test_region_uniform_and_random_distributions():
    sampler, _, _ = make_sampler()
    assert np.allclose(sampler.region_distribution("random"), [0.5, 0.3, 0.2])
    assert np.allclose(sampler.region_distribution("region_uniform"), [1 / 3] * 3)


def test_sampling_inside_a_region_is_uniform_and_stays_inside():
    sampler, _, labels = make_sampler()
    prompt_ids, regions = sampler.sample(30_000, [0.0, 0.0, 1.0], torch.Generator().manual_seed(0))
    assert (regions == 2).all() and (labels[prompt_ids] == 2).all()
    counts = np.bincount(prompt_ids, minlength=100)[80:]
    assert counts.min() > 0.8 * 1500 and counts.max() < 1.2 * 1500  # 20 prompts, 1500 each expected


def test_importance_weights_undo_the_allocation_on_average():
    sampler, corpus, _ = make_sampler()
    pi = np.array([0.1, 0.1, 0.8])
    batch = choose_conditions(["c"] * 4000, np.zeros(4000), torch.full((4000,), 999), 1000, "aria", sampler, corpus,
                              torch.Generator().manual_seed(0), region_probabilities=pi, text_drop_prob=0.0,
                              importance_weighting=True)
    replaced = ~batch.is_paired
    weights, regions = batch.sample_weights[replaced], batch.region_ids[replaced]
    # Weighted region mass recovers RC's corpus allocation [0.5, 0.3, 0.2].
    mass = np.array([weights[regions == k].sum().item() for k in range(3)]) / weights.sum().item()
    assert np.allclose(mass, [0.5, 0.3, 0.2], atol=0.03)


def test_step_generator_depends_on_every_coordinate():
    draws = {tuple(torch.rand(4, generator=step_generator(*key)).tolist())
             for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]}
    assert len(draws) == 5
    assert torch.equal(torch.rand(4, generator=step_generator(3, 7, 0, 1)),
                       torch.rand(4, generator=step_generator(3, 7, 0, 1)))


def test_paired_batches_cover_each_epoch_once_and_shard_processes():
    num_items, batch, processes = 24, 3, 2
    seen = []
    for micro_step in range(4):  # 4 micro-steps x 2 processes x 3 = one epoch
        shard0 = paired_batch_indices(num_items, batch, micro_step, 0, processes, seed=5)
        shard1 = paired_batch_indices(num_items, batch, micro_step, 1, processes, seed=5)
        assert not set(shard0) & set(shard1)
        seen.extend(shard0.tolist() + shard1.tolist())
    assert sorted(seen) == list(range(num_items))
    next_epoch = np.concatenate([paired_batch_indices(num_items, batch, m, p, processes, seed=5)
                                 for m in range(4, 8) for p in range(processes)])
    assert sorted(next_epoch.tolist()) == list(range(num_items)) and not np.array_equal(next_epoch, seen)


def test_importance_weights_are_unbiased_with_few_random_samples_per_micro_batch():
    """E_pi[w f(region)] must equal RC's E_b[f] at any batch size; self-normalising w over the 2 random
    samples of a micro-batch would give an estimate biased towards the unweighted E_pi[f]."""
    sizes = np.array([400, 200, 120, 80, 60, 40, 30, 20, 15, 12, 8, 6, 4, 3, 1, 1])  # K = 16
    labels = np.repeat(np.arange(len(sizes)), sizes)
    sampler = ConditionSampler(len(labels), labels)
    base = sampler.corpus_probabilities
    statistic = np.linspace(1.0, 5.0, len(sizes))  # a per-region quantity, e.g. its discrepancy
    scores = statistic ** 2  # an allocation that favours the regions where the statistic is large
    allocation = 0.9 * scores / scores.sum() + 0.1 * base  # eps = 0.1
    corpus = [f"prompt {i}" for i in range(len(labels))]
    rc_expectation, unweighted_expectation = (base * statistic).sum(), (allocation * statistic).sum()
    assert unweighted_expectation - rc_expectation > 0.5  # the allocation really shifts the statistic

    generator = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(6000):  # micro-batches of 2 samples, both replaced (p(T) = 1)
        batch = choose_conditions(["c", "c"], np.full(2, -1), torch.full((2,), 1000), 1000, "aria", sampler, corpus,
                                  generator, region_probabilities=allocation, text_drop_prob=0.0,
                                  importance_weighting=True)
        estimates.append((batch.sample_weights.numpy() * statistic[batch.region_ids.numpy()]).mean())
    estimates = np.asarray(estimates)
    standard_error = estimates.std() / np.sqrt(len(estimates))
    assert abs(estimates.mean() - rc_expectation) < 4 * standard_error + 0.01
