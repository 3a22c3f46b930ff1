"""`normexp bench`: compile time and step time of a config, with and without per-layer stats.

Both step variants are compiled first, then timed in alternating repeats so that drift in the
machine's speed falls on both alike. Figures are medians over repeats of ms per step.
"""

import platform
import statistics
import time

import jax

from normexp import data as data_lib
from normexp.train import init_state, make_train_step


def bench(cfg, *, steps=10, repeats=5, warmup=3):
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.vocab_size, cfg.data.seq_len)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch = jax.device_put(data_lib.batch(corpus.train, seed=cfg.run.seed, step=0,
                                          batch_size=B, seq_len=T))
    variants = {}
    for grad_norms in (True, False):
        graphdef, tx, state = init_state(cfg, corpus.vocab_size)
        t0 = time.perf_counter()
        step = make_train_step(graphdef, tx, grad_norms=grad_norms).lower(state, *batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, _ = step(state, *batch)
        jax.block_until_ready(state)
        variants[grad_norms] = {"step": step, "state": state, "compile_s": compile_s, "ms": []}
    for _ in range(repeats):
        for v in variants.values():
            state = v["state"]
            t0 = time.perf_counter()
            for _ in range(steps):
                state, _ = v["step"](state, *batch)
            jax.block_until_ready(state)
            v["ms"].append((time.perf_counter() - t0) / steps * 1e3)
            v["state"] = state

    def report(v):
        ms = statistics.median(v["ms"])
        return {"compile_seconds": round(v["compile_s"], 3), "ms_per_step": round(ms, 2),
                "ms_per_step_all": [round(x, 2) for x in v["ms"]],
                "tokens_per_s": round(B * T / ms * 1e3, 1)}

    on, off = report(variants[True]), report(variants[False])
    return {
        "config": {"n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model,
                   "n_head": cfg.model.n_head, "seq_len": T, "batch_size": B,
                   "norm": cfg.model.norm.kind, "placement": cfg.model.placement},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "devices": [str(d) for d in jax.devices()]},
        "steps_per_repeat": steps, "repeats": repeats,
        "grad_norms_on": on, "grad_norms_off": off,
        "grad_norm_overhead_pct": round((on["ms_per_step"] / off["ms_per_step"] - 1) * 100, 2),
    }
