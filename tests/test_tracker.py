import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aria_utils.method.conditioning import ConditionSampler
from aria_utils.method.region_tracker import RegionTracker

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=60)
settings.load_profile("ci")


def random_tracker(num_regions, base, eps, tau, seed, steps=5, normalize=True):
    tracker = RegionTracker(num_regions, base_probabilities=base, uniform_mix=eps, temperature=tau,
                            warmup_steps=0, normalize_timesteps=normalize)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        size = int(rng.integers(1, 20))
        tracker.update(rng.integers(-1, num_regions, size), rng.exponential(1.0, size), rng.integers(0, 1000, size))
    return tracker


@given(num_regions=st.integers(1, 12), eps=st.floats(0.01, 1.0), tau=st.floats(0.1, 5.0), seed=st.integers(0, 10**6),
       base_seed=st.integers(0, 10**6))
def test_probabilities_are_a_distribution_with_eps_floor(num_regions, eps, tau, seed, base_seed):
    base = np.random.default_rng(base_seed).uniform(0.01, 1.0, num_regions)
    tracker = random_tracker(num_regions, base, eps, tau, seed)
    pi = tracker.probabilities()
    assert pi.shape == (num_regions,)
    assert abs(pi.sum() - 1.0) < 1e-9
    assert np.all(pi >= eps * tracker.base - 1e-12)


@given(seed=st.integers(0, 10**6), drift=st.floats(0.0, 0.02))
def test_ema_tracks_a_drifting_signal(seed, drift):
    # Signal of region 0: s_t = 1 + drift * t, observed with N(0, 0.05^2) noise, 16 samples per step.
    # With decay 0.9 the EMA lags a linear drift by drift * decay / (1 - decay) = 9 * drift, and the
    # noise of the mean of 16 samples contributes at most a few 0.05/4 * sqrt((1-d)/(1+d)) ~ 0.003.
    # Bound stated: |estimate - s_t| <= 9 * drift + 0.02 after a burn-in of 50 steps.
    tracker = RegionTracker(1, ema_decay=0.9, warmup_steps=0, normalize_timesteps=False)
    rng = np.random.default_rng(seed)
    for t in range(200):
        signal = 1.0 + drift * t
        tracker.update(np.zeros(16, dtype=int), signal + rng.normal(0, 0.05, 16))
        if t >= 50:
            assert abs(tracker.estimates()[0] - signal) <= 9 * drift + 0.02


def test_bias_correction_makes_first_estimate_exact():
    tracker = RegionTracker(3, ema_decay=0.99, normalize_timesteps=False)
    tracker.update([0, 0], [2.0, 4.0])
    assert tracker.estimates()[0] == pytest.approx(3.0)


def test_unvisited_regions_start_optimistic():
    tracker = RegionTracker(3, normalize_timesteps=False, warmup_steps=0)
    tracker.update([0, 1], [1.0, 5.0])
    assert tracker.estimates()[2] == pytest.approx(5.0)


@given(seed=st.integers(0, 10**6), rise=st.floats(0.5, 5.0), region=st.integers(0, 3))
def test_rising_region_gets_more_probability(seed, rise, region):
    # Two identical trackers see the same history; then region `region`'s discrepancy rises in one
    # of them only. That region must end with more probability there, and every other region with less.
    steady = random_tracker(4, None, 0.1, 1.0, seed, steps=3, normalize=False)
    rising = random_tracker(4, None, 0.1, 1.0, seed, steps=3, normalize=False)
    for _ in range(5):
        values = np.ones(4)
        steady.update(np.arange(4), values)
        values[region] += rise
        rising.update(np.arange(4), values)
    others = np.arange(4) != region
    assert rising.probabilities()[region] > steady.probabilities()[region]
    assert np.all(rising.probabilities()[others] < steady.probabilities()[others])


def test_warmup_samples_from_the_base():
    tracker = RegionTracker(2, base_probabilities=[0.8, 0.2], warmup_steps=3, normalize_timesteps=False)
    for _ in range(3):
        assert np.allclose(tracker.probabilities(), [0.8, 0.2])
        tracker.update([1], [10.0])
    assert tracker.probabilities()[1] > 0.2


def test_timestep_normalisation_removes_the_timestep_confound():
    # Region 0 always sees high-noise timesteps, region 1 low-noise ones; the raw discrepancy is
    # dominated by the timestep, but per-timestep both regions are equally hard.
    tracker = RegionTracker(2, normalize_timesteps=True, num_timestep_buckets=2, warmup_steps=0)
    raw = RegionTracker(2, normalize_timesteps=False, warmup_steps=0)
    for step in range(40):
        regions = np.array([0, 0, 1, 1, 0, 1])
        timesteps = np.array([900, 900, 100, 100, 100, 900]) if step % 2 else np.array([900, 900, 100, 100, 900, 100])
        discrepancy = np.where(timesteps > 500, 10.0, 1.0)
        tracker.update(regions, discrepancy, timesteps)
        raw.update(regions, discrepancy, timesteps)
    assert raw.estimates()[0] > 2 * raw.estimates()[1]
    assert tracker.estimates()[0] == pytest.approx(tracker.estimates()[1], rel=0.05)


@given(seed=st.integers(0, 10**6))
def test_state_round_trips_through_json(seed):
    tracker = random_tracker(5, None, 0.2, 0.7, seed)
    restored = RegionTracker(5, uniform_mix=0.2, temperature=0.7, warmup_steps=0)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert np.array_equal(restored.probabilities(), tracker.probabilities())
    assert restored.state_dict() == tracker.state_dict()


def test_load_rejects_other_region_count():
    with pytest.raises(ValueError, match="--num_regions"):
        RegionTracker(3).load_state_dict(RegionTracker(4).state_dict())


def test_statistics_sum_like_one_big_batch():
    # Per-process statistics summed (what the all-reduce does) give the same update as one process.
    a, b = RegionTracker(3, normalize_timesteps=True), RegionTracker(3, normalize_timesteps=True)
    regions, values, timesteps = np.array([0, 1, 2, 0, 1]), np.array([1.0, 2, 3, 4, 5]), np.array([10, 500, 999, 20, 700])
    a.update(regions, values, timesteps)
    b.update_from_statistics(b.step_statistics(regions[:2], values[:2], timesteps[:2])
                             + b.step_statistics(regions[2:], values[2:], timesteps[2:]))
    assert a.state_dict() == b.state_dict()


def test_empirical_frequencies_match_probabilities():
    from scipy.stats import chisquare

    tracker = random_tracker(6, np.array([5, 1, 1, 2, 1, 10.0]), 0.1, 0.5, seed=3)
    pi = tracker.probabilities()
    labels = np.repeat(np.arange(6), [50, 10, 10, 20, 10, 100])
    sampler = ConditionSampler(len(labels), labels)
    _, regions = sampler.sample(50_000, pi, torch.Generator().manual_seed(0))
    counts = np.bincount(regions, minlength=6)
    # Fixed seed; a 1e-3 significance level keeps the test meaningful (a wrong sampler fails by far).
    assert chisquare(counts, 50_000 * pi).pvalue > 1e-3
    wrong = np.roll(pi, 1)
    assert chisquare(counts, 50_000 * wrong).pvalue < 1e-6


@pytest.mark.parametrize("allocation", ["level", "dro", "progress"])
@given(num_regions=st.integers(1, 12), eps=st.floats(0.01, 1.0), seed=st.integers(0, 10**6))
def test_every_rule_gives_a_distribution_with_eps_floor(allocation, num_regions, eps, seed):
    tracker = RegionTracker(num_regions, uniform_mix=eps, allocation=allocation, dro_step_size=0.5, warmup_steps=0)
    rng = np.random.default_rng(seed)
    for _ in range(8):
        size = int(rng.integers(1, 20))
        tracker.update(rng.integers(-1, num_regions, size), rng.exponential(1.0, size), rng.integers(0, 1000, size))
        pi = tracker.probabilities()
        assert abs(pi.sum() - 1.0) < 1e-9 and np.all(pi >= eps * tracker.base - 1e-12)


def feed(tracker, levels_per_step, steps):
    """Every region visited every step; region k's discrepancy at step t is levels_per_step(t)[k]."""
    num_regions = tracker.num_regions
    for step in range(steps):
        levels = np.asarray(levels_per_step(step), dtype=np.float64)
        tracker.update(np.repeat(np.arange(num_regions), 4), np.repeat(levels, 4))


def test_dro_weights_grow_with_accumulated_discrepancy():
    tracker = RegionTracker(3, uniform_mix=0.1, allocation="dro", dro_step_size=0.5, warmup_steps=0,
                            normalize_timesteps=False)
    feed(tracker, lambda step: [1.0, 1.1, 1.2], 40)  # levels within +-10 %, as in the smooth benchmark
    assert np.allclose(tracker.log_weights, [-4.0, -2.0, 0.0])  # eta * sum of the gaps: 0.5 * 40 * 0.1 per gap
    pi = tracker.probabilities()
    assert pi[2] > 0.75 and pi[0] < pi[1] < pi[2]  # exponentiated weights separate what levels barely do
    level = RegionTracker(3, uniform_mix=0.1, warmup_steps=0, normalize_timesteps=False)
    feed(level, lambda step: [1.0, 1.1, 1.2], 40)
    assert level.probabilities()[2] < 0.4


def test_progress_prefers_the_region_that_is_still_improving():
    tracker = RegionTracker(3, uniform_mix=0.1, allocation="progress", warmup_steps=0, normalize_timesteps=False)
    # Region 0: high but stuck (a gap the student cannot close); region 1: falling; region 2: low, flat.
    feed(tracker, lambda step: [3.0, 2.0 * 0.97 ** step, 0.5], 40)
    pi = tracker.probabilities()
    assert pi[1] > 0.8 and pi[0] < 0.1  # the level rule would favour region 0
    assert tracker.learning_progress()[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("allocation", ["dro", "progress"])
def test_rule_state_round_trips_through_json(allocation):
    tracker = RegionTracker(4, allocation=allocation, warmup_steps=0)
    feed(tracker, lambda step: [1.0, 2.0 * 0.9 ** step, 0.5, 1.5], 12)
    restored = RegionTracker(4, allocation=allocation, warmup_steps=0)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert np.array_equal(restored.probabilities(), tracker.probabilities())
    with pytest.raises(ValueError, match="--aria_allocation"):
        RegionTracker(4, allocation="level").load_state_dict(tracker.state_dict())


def test_resume_with_another_allocation_rule_is_named_before_loading():
    from types import SimpleNamespace

    from aria_utils.training.checkpointing import TrainingState, resume_mismatches

    now = SimpleNamespace(student_config="bk_small", student_model_name_or_path=None, use_lora=False, lora_rank=4,
                          lora_target_modules=None, use_ema=False, aria_allocation="dro")
    checkpoint_args = dict(vars(now), aria_allocation="level")
    assert resume_mismatches(TrainingState(args=checkpoint_args), vars(now), {}) == [
        "--aria_allocation 'level' in the checkpoint, 'dro' now (it defines the tracker state)"]
    assert resume_mismatches(TrainingState(args=dict(vars(now))), vars(now), {}) == []
