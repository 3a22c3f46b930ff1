"""Will a config fit? The memory a run needs, estimated before anything is allocated or written.

A config that cannot fit would otherwise fail deep inside XLA or NumPy with a traceback, after
the run directory exists. The estimate counts what a step holds at once, in bytes:

    state        P * 4 * 5       parameters, AdamW's two moments, gradients and updates (f32)
    activations  L * N * 4 * ((10 + 2 r) C + 2 H T)   saved for the backward pass, N = B * T
                 + 3 * N * V * 4                        logits, softmax and their gradient
    batches      (3 + eval_batches) * 2 * N * 4         prefetched and validation int32 windows
                 + N * 8                                the host's int64 window indices

with P from the model's shapes (embeddings V C + T C, per block (4 + 2 r) C^2 of kernels plus
(13 + r) C of biases and norms). It is a floor, not a bound: XLA's temporaries come on top, so a run refused here
could never have run, and one admitted may still be too large. Remat keeps one block's
activations plus the L block inputs.
"""

import os
import re

from normexp.errors import UsageError

F32 = 4
# the keys a too-large estimate may be blamed on, in the order they are tried
KEYS = ("train.batch_size", "data.seq_len", "model.d_model", "model.n_layer", "model.mlp_ratio",
        "model.n_head", "data.eval_batches", "data.vocab_size")


def estimate(values, runs=1, devices=1):
    """Bytes per device by part, from flat config values ({"model.d_model": 128, ...})."""
    C, r, L, H = (values[k] for k in ("model.d_model", "model.mlp_ratio", "model.n_layer",
                                      "model.n_head"))
    B, T, V = values["train.batch_size"], values["data.seq_len"], values["data.vocab_size"]
    N = B * T
    # kernels, their biases and up to four norms per block; embeddings and the final norm
    P = V * C + T * C + L * ((4 + 2 * r) * C * C + (13 + r) * C) + 2 * C
    per_block = N * F32 * ((10 + 2 * r) * C + 2 * H * T)
    kept = L * N * C * F32 + per_block if values["train.remat"] else L * per_block
    return {"parameters and optimizer state": runs * P * F32 * 5,
            "activations": runs * (kept + 3 * N * V * F32) // devices,
            "batches": runs * ((3 + values["data.eval_batches"]) * 2 * N * F32 + N * 8)}


def device_memory():
    """(bytes, what) of one device: an accelerator's own memory, or the host's for CPU."""
    import jax
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"], f"{device.device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's memory limit, when it has one
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if re.fullmatch(r"\d+", limit):
            total = min(total, int(limit))
    except OSError:
        pass
    return total, "host memory"


def check(cfg, vocab, runs=1, devices=1, memory=None):
    """Raise UsageError naming the key to lower when the run cannot fit in `memory`, a pair
    (bytes, what) that defaults to one device's."""
    from normexp.config import flatten
    values = {**flatten(cfg), "data.vocab_size": vocab}
    parts = estimate(values, runs, devices)
    need = sum(parts.values())
    limit, where = memory or device_memory()
    if need <= limit:
        return parts
    defaults = {**flatten(type(cfg)()), "data.vocab_size": min(vocab, 256)}
    # blame the key whose default would shrink the estimate most
    key = min(KEYS, key=lambda k: sum(estimate({**values, k: defaults[k]}, runs, devices)
                                      .values()))
    shown = ", ".join(f"{name} {_size(b)}" for name, b in parts.items())
    runs_note = f" for {runs} vectorized runs" if runs > 1 else ""
    raise UsageError(f"{key}={values[key]}: the run needs at least {_size(need)}{runs_note} "
                     f"({shown}) but {where} is {_size(limit)}; lower {key}")


def devices_needed(cfg, vocab, runs, available, memory=None):
    """The fewest of `available` devices that hold the runs by the estimate and split the
    batch evenly: a vectorized group fills one device before another is used."""
    from normexp.config import flatten
    values = {**flatten(cfg), "data.vocab_size": vocab}
    limit, _ = memory or device_memory()
    for count in range(1, available + 1):
        fits = sum(estimate(values, runs, count).values()) <= limit
        if fits and cfg.train.batch_size % count == 0:
            return count
    return available


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
