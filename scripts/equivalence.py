"""Behaviour equivalence of two normexp trees, for a restructuring that must change nothing.

    python scripts/equivalence.py OLD_TREE NEW_TREE [WORK_DIR]

Trains a dozen tiny configs (every placement family, norms with state, diagnostics, z-loss and
soft-capping, remat, bfloat16, a divergence) through each tree's command line, and lowers each
tree's train step with every statistic on. Their summary.json and metrics.jsonl, less what
measures time or the machine, and the sha256 of the lowered program must be identical; exits
1 naming what differs. (A tree: a checkout's root, e.g. `git worktree add /tmp/old HEAD~1`.)
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "data.seq_len=16",
        "train.batch_size=4", "train.steps=6", "log.every=2", "train.eval_every=3",
        "train.checkpoint_every=3", "data.eval_batches=2", "log.tensorboard=false",
        "log.progress=false"]
CONFIGS = {
    "pre": [], "post": ["model.placement=post", "model.final_norm=false"],
    "peri": ["model.placement=peri"], "ngpt": ["model.placement=ngpt", "model.norm.kind=none"],
    "rms_qk": ["model.norm.kind=rmsnorm", "model.qk_norm=per_head"],
    "batchnorm": ["model.norm.kind=batchnorm"],
    "diag": ["log.attention=true", "log.activations=true", "log.grad_norms=true"],
    "zloss_cap": ["optim.z_loss=1e-4", "model.attn_softcap=30.0"],
    "remat": ["train.remat=true"], "derf": ["model.norm.kind=derf"],
    "diverge": ["optim.lr=1e3", "optim.warmup_steps=0"],
    "bf16": ["model.dtype=bfloat16"],
}
# what differs from one run to the next on the same tree: timings, the machine, the paths
MACHINE = {"tokens_per_s", "compile_seconds", "versions", "allocator", "run_dir"}

LOWER = """
import hashlib, sys, yaml
from normexp import config, data
from normexp.step import init_state, make_train_step
tiny = [a.split("=", 1) for a in sys.argv[1:]]
cfg = config.build({}, [(k, yaml.safe_load(v)) for k, v in tiny] + [
    ("log.attention", True), ("log.activations", True), ("log.grad_norms", True)])
corpus = data.load_corpus("", 0, cfg.data.seq_len)
graphdef, tx, state = init_state(cfg, corpus.vocab_size)
x, y = data.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=16)
step = make_train_step(graphdef, tx, grad_norms=True, activations=True, attention=True,
                       log=(2, 6))
print(hashlib.sha256(step.lower(state, x, y).as_text().encode()).hexdigest())
"""


def clean(value):
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if k not in MACHINE}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def behaviour(tree, work):
    """{config: (exit code, summary, metrics)} and the lowered step's sha256, of one tree."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "JAX_PLATFORMS": "cpu"}
    out = {}
    for name, extra in CONFIGS.items():
        run_dir = os.path.join(work, name)
        done = subprocess.run([sys.executable, "-m", "normexp.cli", "train", *TINY, *extra,
                               f"run.out_dir={run_dir}", "--overwrite"],
                              env=env, capture_output=True, text=True)
        summary = os.path.join(run_dir, "summary.json")
        metrics = os.path.join(run_dir, "metrics.jsonl")
        out[name] = {
            "exit": done.returncode,
            "summary": clean(json.load(open(summary))) if os.path.exists(summary) else None,
            "metrics": [clean(json.loads(line)) for line in open(metrics)]
            if os.path.exists(metrics) else None}
    lowered = subprocess.run([sys.executable, "-c", LOWER, *TINY], env=env,
                             capture_output=True, text=True)
    out["lowered_step"] = lowered.stdout.strip() or f"failed: {lowered.stderr[-300:]}"
    return out


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    work = argv[2] if len(argv) == 3 else tempfile.mkdtemp(prefix="normexp-equivalence-")
    old, new = (behaviour(tree, os.path.join(work, side))
                for tree, side in zip(argv[:2], ("old", "new")))
    differ = [k for k in old if old[k] != new.get(k)]
    for name in old:
        print(f"{name:<13} {'differs' if name in differ else 'identical'}"
              + (f"  (exit {old[name]['exit']})" if isinstance(old[name], dict) else ""))
    print("behaviour " + ("differs in " + ", ".join(differ) if differ else "identical")
          + f"; runs under {work}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
