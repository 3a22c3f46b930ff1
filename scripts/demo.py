"""The default study: a Pre-LN and a Post-LN GPT on the embedded corpus, same seed and batches.

Run by `make demo`; prints each run's outcome, the per-block gradient norms at initialisation
side by side, writes a report (figures and table) of both runs, and says where to look next.
A second `make demo` reuses finished runs and continues interrupted ones.
"""

import os
import sys

from normexp.allocator import reexec_with_fast_allocator
from normexp.errors import UsageError

STUDY = [("pre_ln", "configs/pre_ln.yaml"), ("post_ln", "configs/post_ln.yaml")]
OUT = os.path.join("runs", "demo")


def main():
    from normexp.config import load
    from normexp.metric_names import GRAD_NORM, family, parse_metric
    from normexp.report import write_report
    from normexp.rundir import INTERRUPTED, read_metrics
    from normexp.train import run

    summaries = {}
    for name, path in STUDY:
        cfg = load(path, [f"run.out_dir={os.path.join(OUT, name)}", f"run.name={name}"])
        print(f"== {name}: {path}", flush=True)
        summaries[name] = run(cfg, resume=True)
        if summaries[name].status == INTERRUPTED:
            print(f"interrupted; `make demo` again continues from {cfg.run.dir}")
            return 130
    print(f"\n{'run':<9} {'status':<11} {'final val loss':>14} {'tokens/s':>9}")
    for name, s in summaries.items():
        loss = "-" if s.final_val_loss is None else f"{s.final_val_loss:.4f}"
        print(f"{name:<9} {s.status:<11} {loss:>14} {s.tokens_per_s or 0:>9.0f}")
    at_init = {name: read_metrics(os.path.join(OUT, name))[0] for name in summaries}
    blocks = sorted((parse_metric(k)[1], k) for k in at_init["pre_ln"]
                    if parse_metric(k)[0] == family(GRAD_NORM))
    print("\ngradient norm per block at initialisation (step 0):")
    print(f"{'block':<10}" + "".join(f"{name:>10}" for name in at_init))
    for index, key in blocks:
        print(f"{index:<10}" + "".join(f"{m[key]:>10.4f}" for m in at_init.values()))
    report = os.path.join(OUT, "report")
    write_report(OUT, report)
    print(f"\nresults: {os.path.abspath(OUT)}/<run>/ (metrics.jsonl, summary.json, config.yaml, "
          f"checkpoints/)")
    print(f"report:  {os.path.abspath(report)}/report.html (and report.md, the PNG figures)")
    print(f"view:    tensorboard --logdir {OUT}   (pip install tensorboard, if it is missing)")
    print(f"afresh:  rm -rf {OUT} && make demo")
    return 0


if __name__ == "__main__":
    reexec_with_fast_allocator()
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
