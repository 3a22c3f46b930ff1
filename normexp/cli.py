"""The `normexp` command line: it parses arguments and calls the library.

Commands import what they use when they run, so `normexp --help` answers without loading JAX.
"""

import argparse
import functools
import json
import os
import re
import signal
import sys

from normexp.errors import (EXIT_BUSY, EXIT_STORAGE, EXIT_USAGE, BusyError, LostProcessError,
                            StorageError, UsageError)

DESCRIPTION = ("Train and compare normalization layers in transformers with ten commands: "
               "train (one run), sweep (every run of a sweep file), compare (runs side by "
               "side), ls (the runs under a directory), results (a sweep's table), report "
               "(figures and tables of runs), prune (what each block of a trained run adds), "
               "claims (published claims about norms, tested), prepare (tokenize your own "
               "corpus) and bench (compile and step times).")

# The commands that train, in this process or in the --worker processes they start (`sweep
# --worker`: `normexp.workers`), and so may save checkpoints in the background: their process
# gets the stderr filter that a failed background save needs (`stderr_filter.StderrFilter`).
TRAINING = ("train", "sweep", "claims")

# A first argument like this is a forgotten `=`, not a config file name.
_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# An override starts with its key; a path with `=` in it (a sweep's run, `lr=0.001,seed=0/`)
# does not, since its `=` comes after a `/` or a `,`.
_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _split_config_args(args):
    """[CONFIG.yaml] [dotted.key=value ...] -> (path or None, overrides). The config file may
    stand anywhere among the overrides, which apply over it in their order."""
    path, overrides = None, []
    for arg in args:
        if _OVERRIDE.match(arg) and not os.path.isfile(arg):
            overrides.append(arg)
            continue
        if (_DOTTED_KEY.fullmatch(arg) and not arg.lower().endswith((".yaml", ".yml"))
                and not os.path.exists(arg)):
            raise UsageError(f"{arg!r}: expected dotted.key=value (e.g. model.n_layer=8); "
                             f"a config file ends in .yaml")
        if path is not None:
            raise UsageError(f"{arg!r}: expected dotted.key=value beside the config file "
                             f"(only one CONFIG.yaml may be given)")
        path = arg
    return path, overrides


def _load(args):
    from normexp.config import load
    return load(*_split_config_args(args))


def cmd_train(ns):
    cfg = _load(ns.config)  # a config error is reported before JAX is loaded
    from normexp.parallel import initialize_distributed, is_primary
    initialize_distributed()  # before anything starts a backend
    from normexp.console import end_line
    from normexp.rundir import INTERRUPTED
    from normexp.train import run
    summary = run(cfg, resume=ns.resume, overwrite=ns.overwrite, missing_ok=False)
    if is_primary():  # a job's other processes speak only when they fail
        print(end_line(summary))
    return 128 + signal.Signals[summary.signal].value if summary.status == INTERRUPTED else 0


def cmd_sweep(ns):
    if ns.worker:  # one of --max-parallel's processes: its parent sends the units
        from normexp.workers import pin, serve
        pin()
        return serve()
    from normexp import config as config_lib, sweep as sweep_lib
    sweep = sweep_lib.load(ns.sweep_file, out_dir=ns.out,
                           settings=config_lib.parse_overrides(ns.set))
    shard = sweep_lib.parse_shard(ns.shard) if ns.shard else (1, 1)
    if ns.dry_run:  # as the sweep would run: a directory's sweep.json is checked, not written
        print(sweep_lib.describe(sweep_lib.claim_directory(sweep, write=False), shard))
        return 0
    code = sweep_lib.run(sweep, shard=shard, max_parallel=ns.max_parallel, wait=not ns.no_wait)
    from normexp import results
    paths = results.write(results.table(sweep.out_dir), sweep.out_dir)
    if code in (0, 1):  # every run of this share is finished
        print(f"results: {paths[0]} (normexp results {sweep.out_dir} prints the table)",
              file=sys.stderr)
    return code


def cmd_compare(ns):
    from normexp.compare import compare
    text, written = compare(ns.runs, ns.out)
    print(text)
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def cmd_ls(ns):
    from normexp.compare import listing
    from normexp.results import to_text
    frame = listing(ns.dir)
    if frame.empty:
        print(f"{ns.dir}: no runs", file=sys.stderr)
    else:
        print(to_text(frame))
    return 0


def cmd_results(ns):
    from normexp import results
    from normexp.report import status_line
    table = results.table(ns.sweep_dir)
    print(results.to_text(table))
    paths = results.write(table, ns.sweep_dir)
    print(status_line(table), file=sys.stderr)
    print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return 0


def cmd_report(ns):
    from normexp.report import write_report
    paths = write_report(ns.path if len(ns.path) > 1 else ns.path[0], ns.out, dpi=ns.dpi,
                         format=ns.format)
    print(f"{os.path.dirname(paths[-1])}: {', '.join(os.path.basename(p) for p in paths)}")
    return 0


def cmd_prune(ns):
    from normexp.prune import prune, table, write
    for run in ns.runs:
        numbers = prune(run, batches=ns.batches)
        print(table(numbers))
        print(f"wrote {write(numbers)}", file=sys.stderr)
    return 0


def cmd_claims(ns):
    from normexp.claims import run_claims
    from normexp.studies import SCALES, resized
    scale = resized(SCALES["quick" if ns.quick else "full"], ns.scale)
    out = ns.out or os.path.join("claims", scale.name)
    only = [int(n) for n in ns.only.split(",")] if ns.only else None
    results = run_claims(scale, out, only=only, echo=lambda line: print(line, file=sys.stderr))
    for r in results:
        print(f"{r.number}. {r.claim}\n   setup:    {r.setup}\n   measured: {r.verdict.figure}"
              f"\n   verdict:  {r.verdict.verdict.upper()} ({r.verdict.rule})")
    print(f"wrote {os.path.join(out, 'claims.md')}", file=sys.stderr)
    return 0


def _claim_numbers(text):
    from normexp.claims import CLAIMS
    numbers = text.split(",")
    if not all(n.isdigit() and int(n) in CLAIMS for n in numbers):
        raise argparse.ArgumentTypeError(f"expected claim numbers from {min(CLAIMS)} to "
                                         f"{max(CLAIMS)} separated by commas, got {text!r}")
    return text


def cmd_prepare(ns):
    from normexp.prepare import prepare
    if len(ns.paths) < 2:
        raise UsageError("prepare: expected INPUT... OUT_DIR (at least one input and the "
                         "output directory)")
    *inputs, out = ns.paths
    meta = prepare(inputs, out, tokenizer=ns.tokenizer, field=ns.field,
                   val_fraction=ns.val_fraction, progress=sys.stderr.isatty())
    print(f"{out}: train.bin {meta['train_tokens']} tokens, val.bin {meta['val_tokens']} "
          f"tokens, vocab {meta['vocab_size']} ({meta['tokenizer']}, {meta['dtype']}), "
          f"{meta['tokens_per_s']:.0f} tokens/s")
    return 0


def cmd_bench(ns):
    from normexp.bench import QUICK, bench
    from normexp.config import load
    if ns.accelerator:
        return _accelerator_check(ns)
    path, overrides = _split_config_args(ns.config)
    if ns.quick:  # a tiny model and few steps: every figure, in seconds (for the test suite)
        overrides = QUICK + overrides
        ns.steps, ns.repeats, ns.depths = 2, 2, ns.depths or "2,4"
    depths = _depths(ns.depths or "4,64")
    result = bench(load(path, overrides), steps=ns.steps, repeats=ns.repeats, depths=depths,
                   compile_cache=not ns.no_compile_cache)
    print(json.dumps(result, indent=1))
    return 0


def _accelerator_check(ns):
    from normexp.accelerator import check
    from normexp.rundir import write_atomic
    if ns.config:
        raise UsageError(f"bench --accelerator: takes no config, got {' '.join(ns.config)}")
    text = json.dumps(check(quick=ns.quick, budget_s=ns.budget), indent=1)
    if ns.out:
        write_atomic(ns.out, text + "\n")
        print(f"wrote {ns.out}", file=sys.stderr)
    print(text)
    return 0


def _depths(text):
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        depths = []
    if not depths or min(depths) <= 0:
        raise UsageError(f"--depths {text!r}: expected positive integers like 4,64")
    return depths


def _positive(text):
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """An error is one line on stderr (exit 2), as every other usage error is, pointing to the
    --help that lists the options (argparse's own usage line before it was the top level's for
    an unknown option, whatever the command)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A command's parser: options and positionals mix in any order, so `train CONFIG
    --overwrite key=value` is `train --overwrite CONFIG key=value` (argparse's intermixed
    parsing; with a `--` among the arguments its plain parsing, which treats `--` right)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if self._intermixing or "--" in args:  # the intermixed parse's own two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _Version(argparse.Action):
    """--version, looked up only when asked for: the metadata scan costs every other command."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the installed version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata
        try:
            version = metadata.version("normexp")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed; pip install -e .)"
        print(f"normexp {version}")
        parser.exit()


def parser():
    # allow_abbrev=False everywhere: a prefix such as --o would otherwise mean --overwrite and
    # delete a run, and any later option sharing the prefix would change what it means.
    p = _Parser(prog="normexp", description=DESCRIPTION, allow_abbrev=False,
                epilog="`normexp COMMAND --help` lists a command's options.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                           parser_class=_CommandParser)
    add = functools.partial(sub.add_parser, allow_abbrev=False)
    t = add("train", help="train one run")
    t.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                   help="a YAML config (default: built-in defaults) and dotted overrides, "
                        "applied over it in their order")
    t.add_argument("--resume", action="store_true", help="continue an existing run directory")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.set_defaults(func=cmd_train)
    sw = add("sweep", help="train every run of a sweep file (resumable, shardable)")
    sw.add_argument("sweep_file", metavar="SWEEP.yaml")
    sw.add_argument("--shard", metavar="I/N", help="train only the I-th of N slices (1 <= I <= N)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their count")
    sw.add_argument("--max-parallel", type=_positive, default=1, metavar="K",
                    help="train K units at once in K processes (default 1: in this process)")
    sw.add_argument("--out", help="the sweep's directory (default: out_dir of the sweep file)")
    sw.add_argument("--set", nargs="+", action="extend", default=[], metavar="key=value",
                    help="replace the file's values: a swept key's list (model.d_model=[64,128]), "
                         "seeds=N, or a base key (train.steps=100)")
    sw.add_argument("--no-wait", action="store_true",
                    help="exit 75 instead of waiting when another process trains some runs")
    sw.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    sw.set_defaults(func=cmd_sweep)
    cp = add("compare", help="runs side by side: config differences, losses, gradient norms")
    cp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    cp.add_argument("--out", help="also write compare.png (the gradient-norm profiles) here")
    cp.set_defaults(func=cmd_compare)
    ls = add("ls", help="every run under a directory, with its status (reads only)")
    ls.add_argument("dir", nargs="?", default="runs", metavar="DIR")
    ls.set_defaults(func=cmd_ls)
    rs = add("results", help="print and write the results table of a sweep directory")
    rs.add_argument("sweep_dir", metavar="SWEEP_DIR")
    rs.set_defaults(func=cmd_results)
    rp = add("report", help="write report.md, report.html and figures for runs")
    rp.add_argument("path", nargs="+", metavar="RUNS_OR_SWEEP_DIR",
                    help="a run, a sweep, or a directory of runs (several may be given)")
    rp.add_argument("--out", help="where to write (default: <first path>/report)")
    rp.add_argument("--dpi", type=_positive, default=110, help="figure resolution (default "
                                                               "110; 300 for print)")
    rp.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                    help="also write each figure as PDF or SVG, beside the PNGs the report "
                         "shows")
    rp.set_defaults(func=cmd_report)
    pn = add("prune", help="a trained run's val loss with each block skipped (prune.json)")
    pn.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pn.add_argument("--batches", type=_positive,
                    help="validation batches (default: the run's data.eval_batches)")
    pn.set_defaults(func=cmd_prune)
    cl = add("claims", help="test published claims about norms with small studies")
    cl.add_argument("--quick", action="store_true",
                    help="CPU-sized studies (minutes on 2 cores); default: the full studies, "
                         "meant for an accelerator")
    cl.add_argument("--out", help="where runs and claims.md go (default: claims/<scale>, "
                                  "e.g. claims/quick or claims/quick-init_width=512)")
    cl.add_argument("--only", type=_claim_numbers, metavar="N[,N...]",
                    help="only these claims (numbers as in claims.md)")
    cl.add_argument("--scale", action="append", default=[], metavar="FIELD=VALUE",
                    help="change one size of the studies (a field of studies.Scale, e.g. "
                         "init_width=512 or depths=6,8,10); the default --out then names it")
    cl.set_defaults(func=cmd_claims)
    pr = add("prepare", help="tokenize text, JSONL or Parquet into train.bin/val.bin/meta.json")
    pr.add_argument("paths", nargs="+", metavar="INPUT... OUT_DIR",
                    help="text files (.txt or any other), .jsonl, .parquet; then the output")
    pr.add_argument("--tokenizer", default="bytes",
                    help="bytes (vocab 256), bpe:N (train a byte-level BPE of N tokens on the "
                         "inputs) or PATH/tokenizer.json (default bytes)")
    pr.add_argument("--field", default="text", help="the text field of JSONL and Parquet")
    pr.add_argument("--val-fraction", type=float, default=0.1,
                    help="the last fraction of the tokens that becomes val.bin (default 0.1)")
    pr.set_defaults(func=cmd_prepare)
    b = add("bench", help="time compile and step, with and without per-layer norms")
    b.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    b.add_argument("--steps", type=_positive, default=10, help="steps per timed repeat")
    b.add_argument("--repeats", type=_positive, default=5,
                   help="timed repeats (the median is reported)")
    b.add_argument("--depths", help="n_layer values for the depth section (default 4,64)")
    b.add_argument("--quick", action="store_true",
                   help="a tiny model, 2 steps x 2 repeats, depths 2,4: checks, not figures")
    b.add_argument("--no-compile-cache", action="store_true",
                   help="skip the compile-cache section (it starts two processes)")
    b.add_argument("--accelerator", action="store_true",
                   help="the accelerator check: GPT-2 small's MFU per attention kernel and "
                        "custom_grads, vectorized seeds, data parallel, memory (see README)")
    b.add_argument("--budget", type=_positive, default=420,
                   help="--accelerator: seconds after which no further section starts")
    b.add_argument("--out", help="--accelerator: also write the JSON to this file")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    if argv is None:  # run as a program: pick the allocator before jax is imported
        from normexp.allocator import reexec_with_fast_allocator
        reexec_with_fast_allocator()
    top = parser()
    ns, unknown = top.parse_known_args(argv)
    if unknown:  # named by the command's parser, whose --help lists its options
        (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
        sub.choices[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if ns.command in TRAINING:  # every process that may save in the background comes here
        from normexp.stderr_filter import StderrFilter
        if not isinstance(sys.stderr, StderrFilter):
            sys.stderr = StderrFilter(sys.stderr)
    try:
        return ns.func(ns)
    except UsageError as e:
        print(f"normexp: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BusyError as e:  # another process trains the run: nothing was touched
        print(f"normexp: error: {e}; wait for it to end or stop it", file=sys.stderr)
        return EXIT_BUSY
    except (StorageError, OSError) as e:  # disk full, read-only, permission denied
        error = StorageError.from_os(e) if isinstance(e, OSError) else e
        print(f"normexp: error: {error}", file=sys.stderr)
        return EXIT_STORAGE
    except LostProcessError as e:  # the run is recorded; the job is over for this process
        from normexp.parallel import abandon_job
        abandon_job(f"normexp: error: {e}")
    except KeyboardInterrupt:  # before the training loop takes over the signal
        print("normexp: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
