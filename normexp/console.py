"""What a run says while it runs, on stderr: what runs where (at the start), compiling and its
time, the progress (a bar on a terminal; one line per log step in a file or a pipe, such as a
SLURM log), and one readable line at the end (`normexp train`'s stdout).

Silent with `log.progress: false` and in a sweep's worker processes (their parent draws one
bar for the sweep).
"""

import os
import sys

import numpy as np

from normexp.metric_names import LOSS
from normexp.rundir import DIVERGED, INTERRUPTED


def quiet(cfg):
    return not cfg.log.progress or bool(os.environ.get("NORMEXP_WORKER"))


def count_parameters(params):
    """(all, without the token and position embeddings), from a parameter state."""
    from flax import nnx
    total = embeddings = 0
    for path, leaf in nnx.to_flat_state(params):
        total += leaf.size
        embeddings += leaf.size if path[0] in ("tok_embed", "pos_embed") else 0
    return total, total - embeddings


def _millions(n):
    return f"{n / 1e6:.2f}M" if n >= 1e4 else f"{n}"


class Console:
    """The lines of one run or vectorized group (`runs` of them) from `start` to the end."""

    def __init__(self, cfg, start, runs):
        self.cfg, self.start, self.runs = cfg, start, runs
        self.silent = quiet(cfg)
        self.bar = None
        self.tty = sys.stderr.isatty()

    def say(self, text):
        if not self.silent:
            print(text, file=sys.stderr, flush=True)

    def starting(self, params, devices, device_kind, chosen, allocator):
        """What runs where: parameters, devices, dtype, kernels, allocator."""
        total, body = count_parameters(params)
        name = (self.cfg.run.dir if self.runs == 1 else
                f"{self.runs} runs vectorized ({self.cfg.run.dir}, ...)")
        kernels = ", ".join(f"{key} {value}" for key, value in (
            ("attention", chosen["attention"].value),
            ("custom_grads", "on" if chosen["custom_grads"].value else "off"),
            ("async checkpoints", "on" if chosen["async_checkpoints"].value else "off")))
        self.say(f"{name}: {_millions(total)} parameters ({_millions(body)} without "
                 f"embeddings), {devices} x {device_kind}, {self.cfg.model.dtype}, {kernels}, "
                 f"allocator {allocator}" + (f"; resuming at step {self.start}"
                                             if self.start else ""))
        reasons = "; ".join(f"{key}: {c.reason}" for key, c in chosen.items()
                            if c.reason != "set in the config")
        if reasons:
            self.say(f"  ({reasons})")
        self.say("compiling...")

    def compiled(self, seconds):
        self.say(f"compiled in {seconds:.1f} s")
        if not self.silent and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.cfg.train.steps, initial=self.start,
                            desc=self.cfg.run.name if self.runs == 1 else f"{self.runs} runs",
                            unit="step", dynamic_ncols=True, file=sys.stderr)

    def logged(self, records, done, tokens_per_s):
        """At a log step: the median loss over the runs still training, and tokens/s."""
        losses = [float(r[LOSS]) for r in records.values() if LOSS in r]
        loss = f"{np.median(losses):.4f}" if losses else "-"
        if self.bar is not None:
            self.bar.set_postfix(loss=loss, tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(done - self.bar.n)
        else:
            self.say(f"step {done}/{self.cfg.train.steps}  loss {loss}  "
                     f"{tokens_per_s:,.0f} tokens/s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def end_line(summary, label=None):
    """One readable line for a finished, diverged, interrupted or failed run (its
    rundir.Summary), headed by `label` (default: its directory)."""
    status, steps = summary.status, summary.steps
    parts = [f"{label or summary.run_dir}: {status}"]
    if status == DIVERGED:
        parts[0] += f" at step {summary.diverged_step}"
    elif status == INTERRUPTED:
        parts[0] += f" ({summary.signal or 'stopped'}) after {steps} steps; continue " \
                    f"with --resume"
    elif steps is not None:
        parts.append(f"{steps} steps")
    if summary.final_val_loss is not None:
        parts.append(f"val loss {summary.final_val_loss:.4f}")
    if summary.best_val_loss is not None:
        parts.append(f"best {summary.best_val_loss:.4f}")
    if summary.tokens_per_s:
        parts.append(f"{summary.tokens_per_s:,.0f} tokens/s")
    if summary.error:
        parts.append(summary.error)
    return ", ".join(parts)
