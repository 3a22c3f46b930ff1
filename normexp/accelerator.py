"""`normexp bench --accelerator`: everything a GPU must be measured for, in one call, one JSON.

- `gpt2_small`: GPT-2 small's shape (12 blocks, 768 wide, 12 heads, sequence 1024, bfloat16,
  vocabulary 50304, synthetic tokens) with cuDNN and with XLA attention, custom gradients on
  and off: step time, tokens/s, MFU against the device's dense peak (normexp.hardware) and
  against its measured matmul, compile seconds, memory.
- `vectorized_seeds`: runs per hour of one vectorized group of 8 runs of the placement_warmup
  sweep's model against the same 8 trained one by one (train steps only).
- `data_parallel`: GPT-2 small over every local device against one, the same batch per
  device (skipped with one device).

Memory is XLA's plan for the compiled step (arguments + temporaries + outputs - donated) and,
where the device reports it, the process's peak so far. A variant that cannot run here (cuDNN
without an NVIDIA GPU) is listed with the reason. Sections stop starting once `budget_s` has
passed, and say so. `quick` runs every section at tiny shapes, for the test suite on CPU.
The goals it measures: >= 45% MFU for GPT-2 small in bfloat16 on an H100/H200, and >= 4x the
runs per hour for vectorized seeds on a GPU.
"""

import os
import time

import jax

from normexp import bench, hardware
from normexp import config as config_lib
from normexp.errors import UsageError
from normexp.parallel import Devices
from normexp.step import init_state, make_train_step

GPT2_SMALL = ["model.n_layer=12", "model.d_model=768", "model.n_head=12", "data.seq_len=1024",
              "model.dtype=bfloat16", "train.batch_size=16", "log.every=10"]
GPT2_VOCAB = 50304  # GPT-2's 50257, padded to a multiple of 64 as nanoGPT does
QUICK = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "data.seq_len=32",
         "train.batch_size=4"]
PLACEMENT_WARMUP = os.path.join(os.path.dirname(__file__), "..", "configs", "sweeps",
                                "placement_warmup.yaml")
GROUP = 8


def check(*, quick=False, budget_s=420.0, steps=10, repeats=3):
    """The whole check as a JSON-ready dict."""
    t0 = time.perf_counter()
    left = lambda: budget_s - (time.perf_counter() - t0)
    device = hardware.local_device()
    steps, repeats = (2, 2) if quick else (steps, repeats)
    result = {"device": device.kind, "platform": device.platform,
              "local_devices": jax.local_device_count(), "quick": quick,
              "steps_per_repeat": steps, "repeats": repeats, "flop_count": bench.FLOP_COUNT}
    gpt2 = config_lib.load(None, GPT2_SMALL + (QUICK if quick else []))
    vocab = 256 if quick else GPT2_VOCAB
    matmul = bench.matmul_gflops(getattr(jax.numpy, gpt2.model.dtype),
                                 n=256 if quick else 8192)
    result["matmul_gflops_per_s"] = round(matmul, 1)

    rows = []
    for attention in ("cudnn", "xla"):
        for custom in ("on", "off"):
            row = {"attention": attention, "custom_grads": custom}
            cfg = bench.replace(gpt2, "model", attention=attention, custom_grads=custom)
            if left() <= 0:
                rows.append({**row, "skipped": "time budget spent"})
                continue
            try:
                hardware.choices(cfg, device)
            except UsageError as e:
                rows.append({**row, "skipped": str(e)})
                continue
            rows.append({**row, **measure(cfg, vocab, steps=steps, repeats=repeats,
                                          matmul=matmul)})
    result["gpt2_small"] = {"shape": shape(gpt2, vocab), "variants": rows}
    result["vectorized_seeds"] = (vectorized_seeds(quick, steps=steps, repeats=repeats)
                                  if left() > 0 else {"skipped": "time budget spent"})
    result["data_parallel"] = (data_parallel(gpt2, vocab, steps=steps, repeats=repeats,
                                             matmul=matmul)
                               if left() > 0 else {"skipped": "time budget spent"})
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def shape(cfg, vocab):
    m = cfg.model
    return {"n_layer": m.n_layer, "d_model": m.d_model, "n_head": m.n_head,
            "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size, "vocab": vocab,
            "dtype": m.dtype, "norm": m.norm.kind, "placement": m.placement}


def synthetic_batch(cfg, vocab, runs=None, seed=0):
    """Random token windows (inputs, targets) of the config's shape, on the device."""
    B, T = cfg.train.batch_size, cfg.data.seq_len
    shape = (B, T + 1) if runs is None else (runs, B, T + 1)
    tokens = jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jax.numpy.int32)
    return tokens[..., :-1], tokens[..., 1:]


def memory(compiled):
    """XLA's plan for a compiled step, and the device's peak so far where it reports one."""
    plan = compiled.memory_analysis()
    out = {"planned_mib": round((plan.temp_size_in_bytes + plan.argument_size_in_bytes
                                 + plan.output_size_in_bytes - plan.alias_size_in_bytes)
                                / 2 ** 20, 1) if plan is not None else None}
    stats = jax.local_devices()[0].memory_stats() or {}
    out["device_peak_mib_so_far"] = (round(stats["peak_bytes_in_use"] / 2 ** 20, 1)
                                     if "peak_bytes_in_use" in stats else None)
    return out


def measure(cfg, vocab, *, steps, repeats, matmul, devices=None):
    """Compile one train step as a run would (statistics at log steps), then time it."""
    graphdef, tx, state = init_state(cfg, vocab)
    batch = synthetic_batch(cfg, vocab)
    if devices is not None:
        state, batch = devices.state(state), devices.batch(jax.device_get(batch))
    chosen = hardware.model_choices(cfg.model, cfg.data.seq_len)
    t0 = time.perf_counter()
    step = make_train_step(graphdef, tx, grad_norms=True, log=(cfg.log.every, 1 << 30)
                           ).lower(state, *batch).compile()
    compile_seconds = time.perf_counter() - t0
    variant = bench.Variant(step, state, lambda: batch, compile_seconds, None)
    ms = bench.time_alternating({"v": variant}, steps=steps, repeats=repeats)["v"]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    per_token = bench.flops_per_token(cfg, state["params"])
    out = {"kernels": {k: c.value for k, c in chosen.items()},
           "compile_seconds": round(compile_seconds, 2), "ms_per_step": ms,
           "tokens_per_s": round(tokens / ms * 1e3, 1), "flops_per_token": per_token,
           **{k: v for k, v in bench.throughput(per_token * tokens / (ms / 1e3),
                                                cfg.model.dtype, matmul).items()
              if k not in ("flop_count", "device", "dtype")},
           "memory": memory(step)}
    del variant, step
    return out


def vectorized_seeds(quick, *, steps, repeats):
    """Runs per hour of 8 seeds as one vmapped group against 8 runs one after another."""
    from normexp import sweep as sweep_lib
    from normexp.lanes import Group
    cfg = sweep_lib.load(PLACEMENT_WARMUP).runs[0].cfg
    if quick:
        cfg = bench.replace(cfg, "model", n_layer=2)
    vocab = 256
    graphdef, tx, state = init_state(cfg, vocab)
    one = make_train_step(graphdef, tx, grad_norms=True, log=(cfg.log.every, 1 << 30))
    states = [init_state(bench.replace(cfg, "run", seed=s), vocab)[2] for s in range(GROUP)]
    group = make_train_step(graphdef, tx, grad_norms=True, log=(cfg.log.every, 1 << 30),
                            vectorized=True)
    single_batch, group_batch = synthetic_batch(cfg, vocab), synthetic_batch(cfg, vocab, GROUP)
    group_state = Group(GROUP).stack(states)
    variants = {"one": bench.Variant(one.lower(state, *single_batch).compile(), state,
                                     lambda: single_batch, 0.0, None),
                "group": bench.Variant(group.lower(group_state, *group_batch).compile(),
                                       group_state, lambda: group_batch, 0.0, None)}
    ms = bench.time_alternating(variants, steps=steps, repeats=repeats)
    per_hour = lambda ms_per_step, runs: runs * 3600e3 / (ms_per_step * cfg.train.steps)
    out = {"shape": shape(cfg, vocab), "train_steps": cfg.train.steps, "runs": GROUP,
           "ms_per_step_one_run": ms["one"], "ms_per_step_group": ms["group"],
           "runs_per_hour_one_by_one": round(per_hour(ms["one"], 1), 1),
           "runs_per_hour_vectorized": round(per_hour(ms["group"], GROUP), 1),
           "memory_one_run": memory(variants["one"].step),
           "memory_group": memory(variants["group"].step)}
    out["speedup"] = round(out["runs_per_hour_vectorized"] / out["runs_per_hour_one_by_one"], 2)
    return out


def data_parallel(cfg, vocab, *, steps, repeats, matmul):
    """GPT-2 small (attention auto) on every local device against one, at the same batch per
    device: tokens/s and the scaling efficiency."""
    n = jax.local_device_count()
    if n < 2:
        return {"skipped": f"{n} local device"}
    cfg = bench.replace(cfg, "model", attention="auto", custom_grads="auto")
    one = measure(cfg, vocab, steps=steps, repeats=repeats, matmul=matmul)
    wide = bench.replace(cfg, "train", batch_size=cfg.train.batch_size * n)
    every = measure(wide, vocab, steps=steps, repeats=repeats, matmul=matmul,
                    devices=Devices("auto", wide.train.batch_size))
    return {"devices": n, "batch_per_device": cfg.train.batch_size,
            "tokens_per_s_one_device": one["tokens_per_s"],
            "tokens_per_s_all_devices": every["tokens_per_s"],
            "scaling_efficiency": round(every["tokens_per_s"] / (n * one["tokens_per_s"]), 3),
            "memory_one_device": one["memory"], "memory_all_devices": every["memory"]}
