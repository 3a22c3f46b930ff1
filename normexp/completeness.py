"""Whether a claim's evidence is whole: which runs of a study are missing, and which cells of a
judge's numbers are. A diverged run is a result; a run that did not finish (failed, stopped,
pending) is missing, and a verdict on the rest could differ from one on the whole, so the
judges (normexp.verdicts) give none then.
"""

import itertools
import math
import os

import numpy as np


def completeness(runs):
    """{"missing": names of the runs not finished, "of": how many} of a sweep directory (its
    sweep.json lists every run, started or not) or a list of run directories. A diverged run is
    a result; any other (failed too) is missing: a verdict without it could differ."""
    from normexp.rundir import FINISHED, status
    from normexp.sweep import read_manifest
    if isinstance(runs, (str, os.PathLike)):
        runs = [os.path.join(runs, r["name"]) for r in (read_manifest(runs) or {}).get("runs", [])]
    return {"missing": [os.path.basename(d) for d in runs if status(d) not in FINISHED],
            "of": len(runs)}


def final_losses(summaries):
    """Per run: inf where it diverged (a result), None where it did not finish (missing)."""
    from normexp.rundir import COMPLETED, FINISHED
    return [None if s.status not in FINISHED else s.final_val_loss if s.status == COMPLETED
            and s.final_val_loss is not None else math.inf for s in summaries]


def absent(value):
    """None or NaN (no number), or a collection that is empty or holds one."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return not value or any(map(absent, value))
    return value is None or isinstance(value, (float, np.floating)) and math.isnan(value)


def _leaves(tree, path=()):
    if not isinstance(tree, (dict, list, tuple)):
        return [(path, tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return [leaf for key, sub in items for leaf in _leaves(sub, path + (key,))]


def grid_gaps(tree, *arms):
    """(labels of the missing cells, how many cells) of tree: {arm: ... {arm: per-seed values
    (a list, or a dict by seed)}}. It should fill the grid of every level's keys: `arms[i]`
    where given (what the judge compares), else every key some branch has, seeds included; so
    a missing arm, a missing seed and a value that is None or NaN each count."""
    leaves = dict(_leaves(tree))
    levels = [list(arms[i]) if i < len(arms) and arms[i] else
              list(dict.fromkeys(p[i] for p in leaves if len(p) > i))
              for i in range(max([len(arms), *map(len, leaves)]))]
    grid = list(itertools.product(*levels)) if levels else []
    gaps = [cell for cell in grid if absent(leaves.get(cell))]
    return [" ".join(map(str, c[:-1])) + f" seed {c[-1]}" if len(c) > len(arms)
            else " ".join(map(str, c)) for c in gaps], len(grid)


def value_gaps(numbers, keys):
    """The keys whose measurement is absent (see `absent`)."""
    return [k for k in keys if absent(numbers.get(k))]
