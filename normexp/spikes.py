"""The spike score of a logged series (OLMo 2, Team OLMo et al. 2024, arXiv:2501.00656): the
percentage of values more than k standard deviations above the mean of the values logged in
the W steps before them.

OLMo 2 reports it for the training loss and the gradient norm with k = 7 over the previous
1000 steps; OLMo-core's spike callback defaults to 6 over 128, which normexp takes
(`log.spike_sigma`, `log.spike_window`), since its runs are short. normexp logs every
`log.every` steps, so a window holds the values logged in it (W / log.every of them). A value
is scored once a whole window lies before it (its step >= W) and the window holds two values
or more; a non-finite value is a divergence (summary.json's `diverged_step`), not a spike, and
ends the series. JAX-free: the run computes it when it stops, and analysis reads it back.
"""

import numpy as np

from normexp.metric_names import GRAD_NORM, LOSS


KEYS = tuple(f"{name}_spike_score" for name in (LOSS, GRAD_NORM))  # as summary.json names them


def spike_score(points, *, sigma, window):
    """Percent of the scored values of `points` ([(step, value)] in step order) that exceed
    mean + sigma * std (the population std) of the values logged in [step - window, step);
    None when no value is scored."""
    finite = []
    for step, value in points:
        if value is None or not np.isfinite(value):
            break
        finite.append((step, value))
    if len(finite) < 3:
        return None
    steps = np.array([s for s, _ in finite], np.int64)
    values = np.array([v for _, v in finite], np.float64)
    start = np.searchsorted(steps, steps - window, side="left")  # the window's first index
    scored = spikes = 0
    for i in np.flatnonzero((steps >= window) & (np.arange(len(steps)) - start >= 2)):
        recent = values[start[i]:i]
        scored += 1
        spikes += bool(values[i] > recent.mean() + sigma * recent.std())
    return 100.0 * spikes / scored if scored else None


def spike_scores(records, *, sigma, window):
    """{"loss_spike_score": ..., "grad_norm_spike_score": ...} of a run's metric records."""
    return {key: spike_score([(r["step"], r[name]) for r in records if name in r],
                             sigma=sigma, window=window)
            for key, name in zip(KEYS, (LOSS, GRAD_NORM))}
