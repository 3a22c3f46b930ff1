"""Runs per hour of a sweep: vectorized, one by one, and vectorized in two processes.

    python scripts/bench_sweep.py configs/sweeps/placement_warmup.yaml [--shard 1/4]
        [--steps N] [--repeats 3]

Times `normexp sweep SWEEP --shard I/N` in a fresh process, in a new directory each time (so
compiling is counted, with the sweep's shared compile cache as a real sweep has it), in three
modes, alternating: `vectorize: seeds`, `vectorize: none`, and `vectorize: seeds` with
`--max-parallel 2` (two worker processes, each pinned to half of the cores). Every run of the shipped sweeps costs the same (only values change, not
shapes), so a shard's runs/hour stands for the whole sweep's. Prints the wall times, their
medians, runs/hour and the speed-ups over one by one, as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from normexp import config as config_lib  # noqa: E402
from normexp import sweep as sweep_lib  # noqa: E402

MODES = {"vectorized": ("seeds", []), "one_by_one": ("none", []),
         "vectorized_2_processes": ("seeds", ["--max-parallel", "2"])}


def variant(path, out, vectorize, steps):
    """The sweep file with its own out_dir, vectorize mode, and optionally fewer steps."""
    raw = config_lib.read_yaml(path, what="sweep keys")
    base = raw.get("base") or {}
    if isinstance(base, str):
        base = config_lib.read_yaml(os.path.join(os.path.dirname(path), base))
    train = base.setdefault("train", {})
    if steps:
        train.update(steps=steps, checkpoint_every=steps, eval_every=steps)
    base.setdefault("log", {})["progress"] = False
    return {**raw, "base": base, "vectorize": vectorize, "out_dir": out}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_file")
    p.add_argument("--shard", default="1/4", help="the slice of the sweep to time (I/N)")
    p.add_argument("--steps", type=int, default=0, help="train.steps (default: the sweep's)")
    p.add_argument("--repeats", type=int, default=3)
    ns = p.parse_args()
    shard = sweep_lib.parse_shard(ns.shard)
    normexp = os.path.join(os.path.dirname(sys.executable), "normexp")
    walls, runs = {mode: [] for mode in MODES}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(ns.repeats):
            for mode, (vectorize, flags) in MODES.items():
                out = os.path.join(tmp, f"{mode}-{repeat}")
                path = os.path.join(tmp, f"{mode}-{repeat}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(variant(ns.sweep_file, out, vectorize, ns.steps), f)
                units = sweep_lib.shard_units(sweep_lib.load(path), shard)
                runs[mode] = sum(len(u) for u in units)
                t = time.perf_counter()
                subprocess.run([normexp, "sweep", path, "--shard", ns.shard, *flags],
                               check=True, capture_output=True)
                walls[mode].append(round(time.perf_counter() - t, 2))
                print(f"repeat {repeat + 1} {mode}: {runs[mode]} runs, {walls[mode][-1]} s",
                      file=sys.stderr)
    median = {mode: statistics.median(w) for mode, w in walls.items()}
    per_hour = {mode: round(runs[mode] * 3600 / median[mode], 1) for mode in MODES}
    print(json.dumps({
        "sweep": ns.sweep_file, "shard": ns.shard, "runs": runs, "steps": ns.steps or "sweep's",
        "wall_s": walls, "median_wall_s": median, "runs_per_hour": per_hour,
        "speedup_over_one_by_one": {mode: round(per_hour[mode] / per_hour["one_by_one"], 2)
                                    for mode in MODES},
        "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
