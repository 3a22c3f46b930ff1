import math

import numpy as np
import pytest

from normexp.spikes import spike_score, spike_scores


def reference(points, sigma, window):
    """The definition, value by value, in plain Python."""
    scored = spikes = 0
    for i, (step, value) in enumerate(points):
        if value is None or not math.isfinite(value):
            break
        recent = [v for s, v in points[:i] if s >= step - window]
        if step >= window and len(recent) >= 2:
            mean = sum(recent) / len(recent)
            std = math.sqrt(sum((v - mean) ** 2 for v in recent) / len(recent))
            scored += 1
            spikes += value > mean + sigma * std
    return 100.0 * spikes / scored if scored else None


def test_a_spike_above_the_rolling_mean_counts_and_a_dip_does_not():
    rng = np.random.default_rng(0)
    values = list(3.0 + 0.01 * rng.normal(size=200))
    values[150] = 3.5  # 50 std above: a spike
    values[170] = 2.5  # as far below: not a spike
    points = [(10 * i, v) for i, v in enumerate(values)]  # logged every 10 steps
    score = spike_score(points, sigma=6, window=128)
    scored = sum(1 for s, _ in points if s >= 128)
    assert score == pytest.approx(100.0 / scored)
    assert score == pytest.approx(reference(points, 6, 128))
    assert spike_score(points[:150], sigma=6, window=128) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_random_series_match_the_definition(seed):
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(1, 4, size=300))
    values = np.exp(rng.normal(size=300)) + 100.0 * (rng.random(300) < 0.03)
    points = list(zip(steps.tolist(), values.tolist()))
    for sigma, window in ((1.0, 10), (3.0, 50), (6.0, 128)):
        assert spike_score(points, sigma=sigma, window=window) == pytest.approx(
            reference(points, sigma, window), abs=1e-9)


def test_short_series_are_not_scored_and_a_divergence_ends_the_series():
    assert spike_score([(0, 1.0), (1, 2.0)], sigma=6, window=1) is None
    assert spike_score([(s, 1.0) for s in range(100)], sigma=6, window=128) is None
    flat = [(s, 1.0 + 1e-3 * (s % 2)) for s in range(300)]
    assert spike_score(flat + [(300, float("nan")), (301, 1e9)], sigma=6,
                       window=128) == spike_score(flat, sigma=6, window=128) == 0.0


def test_scores_of_a_runs_records_name_the_loss_and_the_gradient_norm():
    records = [{"step": s, "loss": 1.0 + 1e-3 * (s % 3), "grad_norm": 1.0 + (s == 250) * 9}
               for s in range(300)] + [{"step": 300, "val_loss": 1.0}]
    scores = spike_scores(records, sigma=6, window=128)
    assert scores == {"loss_spike_score": 0.0, "grad_norm_spike_score": pytest.approx(100 / 172)}
