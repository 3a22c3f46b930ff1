"""`normexp bench`: how fast a config trains, and what each feature costs. JSON out.

Sections: `step` (per-layer statistics on vs off), `data` (prefetched real batches vs one fixed
batch), `throughput` (model FLOP/s as MFU, a fraction of the device's dense peak from
normexp.hardware's table, and as a fraction of this machine's own measured matmul FLOP/s),
`remat` (memory and step time with and without), `depth` (compile seconds and statistics
overhead as the model deepens), `compile_cache` (a second process compiling the same step).
Variants compared with each other are compiled first and timed in alternating repeats, so
drift in the machine's speed falls on both alike; figures are medians over repeats.
"""

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from normexp import allocator, hardware
from normexp import config as config_lib
from normexp import data as data_lib
from normexp.step import init_state, make_train_step

QUICK = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "data.seq_len=32",
         "train.batch_size=4"]


FLOP_COUNT = ("6 N + 12 L C T per token (nanoGPT, PaLM appendix B): N the parameters but the "
              "position embedding (the tied token embedding is the output head, so it counts); "
              "12 L C T the attention scores and their weighted sum, forward and backward, over "
              "the full T x T (the causal half is not subtracted)")


def flops_per_token(cfg, params):
    """The model FLOPs of one trained token, as FLOP_COUNT states."""
    n = sum(leaf.size for path, leaf in nnx.to_flat_state(params) if path[0] != "pos_embed")
    m = cfg.model
    return 6 * n + 12 * m.n_layer * m.d_model * cfg.data.seq_len


def matmul_gflops(dtype=jnp.float32, n=1024, calls=10, repeats=5):
    """This machine's practical peak: a jitted n x n `jnp.dot`, median over repeats."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    dot(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = dot(a, b)
        out.block_until_ready()
        seconds.append((time.perf_counter() - t0) / calls)
    return 2 * n ** 3 / statistics.median(seconds) / 1e9


@dataclasses.dataclass
class Variant:
    step: object
    state: dict
    next_batch: object
    compile_seconds: float
    memory: dict
    ms: list = dataclasses.field(default_factory=list)


def compile_variant(cfg, vocab, batch, *, grad_norms=True, activations=False, attention=False,
                    every=None, next_batch=None):
    """The train step compiled for `cfg`, its statistics at every `every`-th step (default:
    log.every)."""
    graphdef, tx, state = init_state(cfg, vocab)
    t0 = time.perf_counter()
    step = make_train_step(graphdef, tx, grad_norms=grad_norms, activations=activations,
                           attention=attention, log=(every or cfg.log.every, 1 << 30),
                           ).lower(state, *batch).compile()
    seconds = time.perf_counter() - t0
    mem = step.memory_analysis()
    memory = {"temp_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1),
              "total_mib": round((mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes)
                                 / 2 ** 20, 1)} if mem is not None else None
    return Variant(step, state, next_batch or (lambda: batch), seconds, memory)


def time_alternating(variants, *, steps, repeats, warmup=2):
    for v in variants.values():
        for _ in range(warmup):
            v.state, _ = v.step(v.state, *v.next_batch())
        jax.block_until_ready(v.state)
    for _ in range(repeats):
        for v in variants.values():
            t0 = time.perf_counter()
            for _ in range(steps):
                v.state, _ = v.step(v.state, *v.next_batch())
            jax.block_until_ready(v.state)
            v.ms.append((time.perf_counter() - t0) / steps * 1e3)
    return {name: round(statistics.median(v.ms), 2) for name, v in variants.items()}


def bench(cfg, *, steps=10, repeats=5, depths=(4, 64), compile_cache=True):
    corpus = data_lib.corpus_of(cfg.data)
    B, T, vocab = cfg.train.batch_size, cfg.data.seq_len, corpus.vocab_size
    tokens = B * T
    fixed = jax.device_put(data_lib.batch(corpus.train, seed=cfg.run.seed, step=0,
                                          batch_size=B, seq_len=T))
    result = {"config": dataclasses.asdict(cfg.model) | {"seq_len": T, "batch_size": B},
              "machine": {"platform": platform.platform(), "processor": platform.machine(),
                          "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
                          "allocator": allocator.active()},
              "steps_per_repeat": steps, "repeats": repeats}

    # per-layer statistics on vs off; activation statistics and the instability diagnostics
    # at log steps and at every step (the cost of one log step)
    on = compile_variant(cfg, vocab, fixed)
    off = compile_variant(cfg, vocab, fixed, grad_norms=False)
    acts = compile_variant(cfg, vocab, fixed, activations=True)
    acts_all = compile_variant(cfg, vocab, fixed, activations=True, every=1)
    diag = compile_variant(cfg, vocab, fixed, attention=True)
    diag_all = compile_variant(cfg, vocab, fixed, attention=True, every=1)
    ms = time_alternating({"on": on, "off": off, "acts": acts, "acts_all": acts_all,
                           "diag": diag, "diag_all": diag_all},
                          steps=max(steps, cfg.log.every), repeats=repeats)
    result["step"] = {
        "compile_seconds": round(on.compile_seconds, 3), "ms_per_step": ms["on"],
        "ms_per_step_no_stats": ms["off"], "tokens_per_s": round(tokens / ms["on"] * 1e3, 1),
        "grad_norm_overhead_pct": round((ms["on"] / ms["off"] - 1) * 100, 2),
        "ms_per_step_activations": ms["acts"],
        "activations_overhead_pct": round((ms["acts"] / ms["on"] - 1) * 100, 2),
        "activations_every_step_overhead_pct": round((ms["acts_all"] / ms["on"] - 1) * 100, 2),
        "ms_per_step_attention": ms["diag"],
        "attention_overhead_pct": round((ms["diag"] / ms["on"] - 1) * 100, 2),
        "attention_every_step_overhead_pct": round((ms["diag_all"] / ms["on"] - 1) * 100, 2),
        "memory": on.memory}
    del acts, acts_all, diag, diag_all

    # the run's data pipeline (prefetched random windows) vs one fixed batch
    prefetch = data_lib.Prefetcher(lambda step: data_lib.batch(
        corpus.train, seed=cfg.run.seed, step=step, batch_size=B, seq_len=T), start=0)
    try:
        real = Variant(on.step, on.state, lambda: next(prefetch), 0.0, on.memory)
        fix = Variant(on.step, jax.tree.map(jnp.copy, on.state), lambda: fixed, 0.0, on.memory)
        ms = time_alternating({"real": real, "fixed": fix}, steps=steps, repeats=repeats)
    finally:
        prefetch.close()
    result["data"] = {"ms_per_step_real_data": ms["real"], "ms_per_step_fixed_batch": ms["fixed"],
                      "difference_pct": round((ms["real"] / ms["fixed"] - 1) * 100, 2)}

    # model FLOP/s against the device's dense peak and against its own matmul FLOP/s
    per_token = flops_per_token(cfg, on.state["params"])
    result["throughput"] = {"flops_per_token": per_token, **throughput(
        per_token * tokens / (result["step"]["ms_per_step"] / 1e3), cfg.model.dtype)}

    # rematerialisation: memory and time, against the default and against the same real loop
    # (remat scans one block at a time, which the default does not below 9 blocks)
    remat_cfg = replace(cfg, "train", remat=True)
    remat = compile_variant(remat_cfg, vocab, fixed)
    looped = compile_variant(replace(cfg, "model", scan_unroll=1), vocab, fixed)
    plain = Variant(on.step, real.state, lambda: fixed, 0.0, on.memory)  # on's was donated
    ms = time_alternating({"plain": plain, "looped": looped, "remat": remat}, steps=steps,
                          repeats=repeats)
    result["remat"] = {"policy": remat_cfg.train.remat_policy,
                       "ms_per_step": ms["remat"], "ms_per_step_without": ms["plain"],
                       "ms_per_step_without_same_loop": ms["looped"],
                       "memory": remat.memory, "memory_without": on.memory,
                       "memory_without_same_loop": looped.memory,
                       "step_time_pct": round((ms["remat"] / ms["plain"] - 1) * 100, 2),
                       "step_time_pct_same_loop": round((ms["remat"] / ms["looped"] - 1) * 100, 2)}
    del on, off, real, fix, remat, plain, looped

    # depth: compile time of the scanned model (one block per iteration at every depth, so the
    # shallow baseline is a real scan too), and the statistics' overhead at each depth
    rows = []
    for depth in depths:
        deep = replace(replace(cfg, "model", n_layer=depth, scan_unroll=1), "train", remat=False)
        d_on = compile_variant(deep, vocab, fixed)
        d_off = compile_variant(deep, vocab, fixed, grad_norms=False)
        few = max(3, steps * cfg.model.n_layer // depth)
        ms = time_alternating({"on": d_on, "off": d_off}, steps=few, repeats=repeats, warmup=1)
        rows.append({"n_layer": depth, "compile_seconds": round(d_on.compile_seconds, 3),
                     "scan_unroll": 1, "steps_per_repeat": few,
                     "ms_per_step": ms["on"], "ms_per_step_no_stats": ms["off"],
                     "grad_norm_overhead_pct": round((ms["on"] / ms["off"] - 1) * 100, 2),
                     "memory": d_on.memory})
        del d_on, d_off
    result["depth"] = {"rows": rows, "compile_ratio_deepest_to_shallowest": round(
        rows[-1]["compile_seconds"] / rows[0]["compile_seconds"], 3)}

    if compile_cache:
        result["compile_cache"] = measure_compile_cache(cfg)
    return result


def throughput(model_flops_per_s, dtype, matmul=None):
    """MFU: model FLOP/s over the dense peak of this device in `dtype` (normexp.hardware's
    table; a device not in it falls back to the measured matmul, and says so), and over the
    measured FLOP/s of a large matmul in `dtype` (`matmul`: already measured, GFLOP/s)."""
    device = hardware.local_device()
    if matmul is None:
        matmul = matmul_gflops(getattr(jnp, dtype), n=1024 if device.platform == "cpu" else 8192)
    peak, source = hardware.peak_flops(device.kind, dtype)
    if peak is None:
        peak, source = matmul * 1e9, f"the measured matmul ({source})"
    return {"flop_count": FLOP_COUNT, "model_gflops_per_s": round(model_flops_per_s / 1e9, 1),
            "device": device.kind, "dtype": dtype, "peak": source,
            "peak_gflops_per_s": round(peak / 1e9, 1), "mfu": round(model_flops_per_s / peak, 4),
            "matmul_gflops_per_s": round(matmul, 1),
            "fraction_of_matmul_peak": round(model_flops_per_s / 1e9 / matmul, 4)}


def replace(cfg, section, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                    **changes)})


def measure_compile_cache(cfg):
    """Compile the same step in two fresh processes sharing a persistent cache directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(config_lib.to_yaml(cfg))
        seconds = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, path,
                                  os.path.join(tmp, "cache")],
                                 capture_output=True, text=True, check=True)
            seconds.append(float(out.stdout.split()[-1]))
    return {"cold_compile_seconds": round(seconds[0], 3),
            "warm_compile_seconds": round(seconds[1], 3),
            "speedup": round(seconds[0] / seconds[1], 1)}


_COMPILE_ONCE = """
import sys, time
from normexp import config, data
from normexp.step import init_state, make_train_step
from normexp.train import enable_compile_cache
cfg = config.load(sys.argv[1])
enable_compile_cache(sys.argv[2])
corpus = data.corpus_of(cfg.data)
batch = data.batch(corpus.train, seed=0, step=0, batch_size=cfg.train.batch_size,
                   seq_len=cfg.data.seq_len)
graphdef, tx, state = init_state(cfg, corpus.vocab_size)
t0 = time.perf_counter()
make_train_step(graphdef, tx, grad_norms=cfg.log.grad_norms).lower(state, *batch).compile()
print(time.perf_counter() - t0)
"""
