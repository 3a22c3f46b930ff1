"""Will a config fit? The memory a run needs, estimated before anything is allocated or written.

A config that cannot fit would otherwise fail deep inside XLA or NumPy with a traceback, after
the run directory exists. The estimate counts what a step holds at once, in bytes:

    state        P * 4 * 3        parameters and AdamW's two moments (f32), all step long
    activations  L * N * D * ((6 + a r) C + H T)   saved for the backward, N = B * T
                 + N * V * D                         the logits (their gradient takes their place)
      or gradients  P * 4         if larger: all are held only once the activations are freed
    batches      (3 + eval_batches) * 2 * N * 4    prefetched and validation int32 windows
                 + N * 8                           the host's int64 window indices

with P from the model's shapes (embeddings V C + T C, per block (4 + 2 r) C^2 of kernels plus
(13 + r) C of biases and norms) and D the bytes of model.dtype (4 float32, 2 bfloat16), which
the model computes in. Per block and token the backward reads the attention's and the MLP's
inputs, q, k, v and the attention output (6 C), the MLP's hidden activation and GELU's input
(a = 2; ReLU keeps a byte mask instead, a = 1), and the softmax probabilities (H T) only where
the attention kernel builds them (xla, einsum), not in the fused cudnn and splash. It is a
floor, not a bound: what the norms keep and XLA's temporaries come on top, so a run refused
here could never have run, and one admitted may still be too large. Remat keeps the L block
inputs plus one block's activations or the logits, whichever is larger.
"""

import os
import re

import jax

from normexp import hardware
from normexp.config import flatten
from normexp.errors import UsageError

F32 = 4
BYTES = {"float32": F32, "bfloat16": 2}
FUSED = ("cudnn", "splash")  # attention kernels that never hold the [B, H, T, T] probabilities
# the keys a too-large estimate may be blamed on, in the order they are tried
KEYS = ("train.batch_size", "data.seq_len", "model.d_model", "model.n_layer", "model.mlp_ratio",
        "model.n_head", "data.eval_batches", "data.vocab_size")


def estimate(values, runs=1, devices=1, *, attention):
    """Bytes per device by part, from flat config values ({"model.d_model": 128, ...}) and the
    attention kernel the run uses (see `attention`)."""
    C, r, L, H = (values[k] for k in ("model.d_model", "model.mlp_ratio", "model.n_layer",
                                      "model.n_head"))
    B, T, V = values["train.batch_size"], values["data.seq_len"], values["data.vocab_size"]
    N, D = B * T, BYTES[values["model.dtype"]]
    # kernels, their biases and up to four norms per block; embeddings and the final norm
    P = V * C + T * C + L * ((4 + 2 * r) * C * C + (13 + r) * C) + 2 * C
    hidden = (2 if values["model.activation"] == "gelu" else 1) * r * C
    per_block = N * D * (6 * C + hidden + (0 if attention in FUSED else H * T))
    logits = N * V * D  # their gradient may be written in their place
    # remat recomputes a block only once the logits are gone
    saved = (L * N * C * D + max(per_block, logits) if values["train.remat"]
             else L * per_block + logits)
    activations, gradients = runs * saved // devices, runs * P * F32
    # every gradient exists only once the backward has freed the activations: count the larger
    peak = {"activations": activations} if activations >= gradients else {"gradients": gradients}
    return {"parameters and optimizer state": runs * P * F32 * 3, **peak,
            "batches": runs * ((3 + values["data.eval_batches"]) * 2 * N * F32 + N * 8)}


def device_memory():
    """(bytes, what) of one device: an accelerator's own memory, or the host's for CPU."""
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


def attention(cfg, device=None):
    """The attention kernel a run of `cfg` uses on `device` (a hardware.Device; default: this
    host's first), as normexp.hardware resolves model.attention (auto: by device and dtype)."""
    return hardware.model_choices(cfg.model, cfg.data.seq_len, device)["attention"].value


def check(cfg, vocab, runs=1, devices=1, memory=None, device=None):
    """Raise UsageError naming the key to lower when the run cannot fit in `memory`, a pair
    (bytes, what) that defaults to one device's; `device` picks the attention kernel."""
    values = {**flatten(cfg), "data.vocab_size": vocab}
    kernel = attention(cfg, device)  # kept for the what-ifs below: a default may not run it
    parts = estimate(values, runs, devices, attention=kernel)
    need = sum(parts.values())
    limit, where = memory or device_memory()
    if need <= limit:
        return parts
    defaults = {**flatten(type(cfg)()), "data.vocab_size": min(vocab, 256)}
    # blame the key whose default would shrink the estimate most
    key = min(KEYS, key=lambda k: sum(estimate({**values, k: defaults[k]}, runs, devices,
                                               attention=kernel).values()))
    shown = ", ".join(f"{name} {_size(b)}" for name, b in parts.items())
    runs_note = f" for {runs} vectorized runs" if runs > 1 else ""
    raise UsageError(f"{key}={values[key]}: the run needs at least {_size(need)}{runs_note} "
                     f"({shown}) but {where} is {_size(limit)}; lower {key}")


def devices_needed(cfg, vocab, runs, available, memory=None, device=None):
    """The fewest of `available` devices that hold the runs by the estimate and split the
    batch evenly: a vectorized group fills one device before another is used."""
    values = {**flatten(cfg), "data.vocab_size": vocab}
    kernel = attention(cfg, device)
    limit, _ = memory or device_memory()
    for count in range(1, available + 1):
        fits = sum(estimate(values, runs, count, attention=kernel).values()) <= limit
        if fits and cfg.train.batch_size % count == 0:
            return count
    return available


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
