"""`normexp sweep`: a grid of runs from one file, resumable, shardable, and vectorized over seeds.

A sweep file has `base:` (a config path, relative to the sweep file, or inline config keys),
axes `grid:` (every combination), `zip:` (lists varied together) and `seeds:`, and optionally
`out_dir:` and `vectorize: seeds`. Each run is `normexp train` of the base plus its overrides,
named from them, in `<out_dir>/<name>/`. Finished runs are skipped and interrupted ones resumed;
`--shard I/N` takes every N-th unit of work. Who trains which run, and when a sweep is done, is
normexp.scheduler's; sweep.json (`claim_directory`) pins the runs a sweep directory holds.
"""

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re

import yaml

from normexp import config as config_lib
from normexp import rundir
from normexp.errors import UsageError, suggest
from normexp.rundir import read_json, write_atomic

KEYS = {"base": "a config file (relative to the sweep file) or inline config keys",
        "grid": "dotted key -> list of values, every combination",
        "zip": "dotted key -> list of values, all lists varied together (or a list of such)",
        "seeds": "a count n (seeds 0..n-1) or a list of seeds, for run.seed",
        "out_dir": "where the runs go (default sweeps/<sweep file stem>)",
        "vectorize": "none, or seeds: train runs that differ only in seed, optim.lr and "
                     "the DyT/Derf alpha inits together with jax.vmap"}
RESERVED = ("run.name", "run.out_dir", "run.seed")
MANIFEST = rundir.SWEEP_MANIFEST


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple  # ((dotted key, value), ...) in axis order, run.seed last
    cfg: config_lib.Config


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    out_dir: str
    axes: tuple  # the swept dotted keys, run.seed last when seeds are swept
    runs: tuple
    vectorize: str
    settings: tuple = ()  # what replaced the file's values (workers load the sweep again)

    def units(self):
        """Runs trained together: one group per config up to seed and lr, or one per run."""
        if self.vectorize == "none":
            return [[r] for r in self.runs]
        groups = {}
        for r in self.runs:
            key = json.dumps({k: v for k, v in config_lib.flatten(r.cfg).items()
                              if k not in config_lib.GROUP_KEYS}, sort_keys=True)
            groups.setdefault(key, []).append(r)
        return list(groups.values())


def _axis(where, values):
    """A non-empty list of values for a swept key."""
    if not isinstance(values, list):
        raise UsageError(f"{where}: expected a list of values, got {values!r}")
    if not values:
        raise UsageError(f"{where}: empty list; give at least one value")
    return values


def _zip_rows(spec, path):
    blocks = spec if isinstance(spec, list) else [spec]
    all_rows, keys = [[]], []
    for i, block in enumerate(blocks):
        where = f"{path}: zip" + (f"[{i}]" if isinstance(spec, list) else "")
        if not isinstance(block, dict) or not block:
            raise UsageError(f"{where}: expected a mapping of dotted key -> list of values")
        lists = {str(k): _axis(f"{where}.{k}", v) for k, v in block.items()}
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) > 1:
            raise UsageError(f"{where}: lists must have one length to be zipped, got "
                             + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        rows = [list(zip(lists, values)) for values in zip(*lists.values())]
        all_rows = [a + b for a in all_rows for b in rows]
        keys += list(lists)
    return keys, all_rows


def _seeds(value, path):
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UsageError(f"{path}: seeds: a count must be >= 1, got {value}")
        return list(range(value))
    seeds = _axis(f"{path}: seeds", value)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UsageError(f"{path}: seeds: expected non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{path}: seeds: {seeds!r} repeats a seed")
    return seeds


def _swept(value, where):
    """A replacement list of values: given as a list, or as command-line YAML text `[1, 2]`."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    return _axis(where, value)


def _replace(raw, settings, path):
    """The file's values replaced by `settings`: a swept key's list (grid or zip), `seeds`, or
    a base key. Returns (raw, the base settings)."""
    raw, base = copy.deepcopy(raw), []
    zips = raw.get("zip") if isinstance(raw.get("zip"), list) else [raw.get("zip")]
    for key, value in settings:
        where = f"{path}: --set {key}"
        blocks = [b for b in [raw.get("grid")] + zips if isinstance(b, dict) and key in b]
        if key == "seeds":
            raw["seeds"] = yaml.safe_load(value) if isinstance(value, str) else value
        elif blocks:
            blocks[0][key] = _swept(value, where)
        else:
            base.append((key, value))
    return raw, base


def load(path, out_dir=None, settings=()):
    """Parse and expand a sweep file; every run's config is validated here, before training.

    settings: (dotted key, value) pairs that replace the file's own: a swept key's list of
    values (grid or zip; text is read as YAML, e.g. `[64, 128]`), `seeds`, or a base key
    (e.g. a smaller `train.steps` to try the sweep out)."""
    raw = config_lib.read_yaml(path, what=f"sweep keys ({', '.join(KEYS)})")
    raw, base_settings = _replace(raw, settings, path)
    try:  # a bad base setting is the command line's fault, not the first run's
        config_lib.build({}, base_settings)
    except UsageError as e:
        if any(str(e).startswith(key) for key, _ in base_settings):
            raise UsageError(f"{path}: --set: {e}") from None
    for key in raw:
        if key not in KEYS:
            near = suggest(key, KEYS)
            hint = f"; did you mean {near!r}?" if near else ""
            raise UsageError(f"{path}: {key}: unknown sweep key{hint} (valid: {', '.join(KEYS)})")
    base = raw.get("base") or {}
    if isinstance(base, str):
        base = config_lib.read_yaml(os.path.join(os.path.dirname(path), base))
    elif not isinstance(base, dict):
        raise UsageError(f"{path}: base: expected a config file path or config keys, got "
                         f"{base!r}")
    if config_lib.flatten(base).get("run.out_dir"):  # each run of a sweep gets its own
        raise UsageError(f"{path}: base: run.out_dir: the sweep places each run under its own "
                         f"out_dir; set the sweep file's top-level out_dir: (or --out) instead")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise UsageError(f"{path}: grid: expected a mapping of dotted key -> list of values")
    grid = {str(k): _axis(f"{path}: grid.{k}", v) for k, v in grid.items()}
    zip_keys, zip_rows = _zip_rows(raw["zip"], path) if raw.get("zip") else ([], [[]])
    seeds = _seeds(raw["seeds"], path) if "seeds" in raw else None
    keys = list(grid) + zip_keys
    for key in keys:
        if keys.count(key) > 1:
            raise UsageError(f"{path}: {key}: swept twice (in grid and zip, or in two zips)")
        if key in RESERVED:
            raise UsageError(f"{path}: {key}: set by the sweep itself (use seeds: for run.seed)")
    vectorize = raw.get("vectorize", "none")
    if vectorize not in ("none", "seeds"):
        raise UsageError(f"{path}: vectorize: must be none or seeds, got {vectorize!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or raw.get("out_dir") or os.path.join("sweeps", stem)
    if not isinstance(out_dir, str):
        raise UsageError(f"{path}: out_dir: expected a directory path, got {out_dir!r}")
    axes = keys + (["run.seed"] if seeds is not None else [])
    train = base.get("train", {})
    if isinstance(train, dict) and not train.get("compile_cache"):  # one shape compiles once
        cache = os.path.join(out_dir, ".compile_cache")
        base = {**base, "train": {**train, "compile_cache": cache}}
    short = short_names(axes)
    runs, names = [], {}
    combos = itertools.product(itertools.product(*grid.values()), zip_rows, seeds or [None])
    for grid_values, zip_row, seed in combos:
        overrides = list(zip(grid, grid_values)) + zip_row
        if seed is not None:
            overrides.append(("run.seed", seed))
        try:
            cfg = config_lib.build(base, base_settings + overrides)
        except UsageError as e:
            where = " ".join(f"{k}={_text(v)}" for k, v in overrides)
            raise UsageError(f"{path}: the run with {where}: {e}") from None
        typed = config_lib.flatten(cfg)  # 1e-3 is a string in YAML 1.1: name what was run
        overrides = [(key, typed[key]) for key, _ in overrides]
        name = run_name(overrides, short)
        if name in names:
            raise UsageError(f"{path}: two runs get the name {name!r}: an axis repeats a value "
                             f"({names[name]} and {overrides})")
        names[name] = overrides
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, name=name, out_dir=os.path.join(out_dir, name)))
        runs.append(Run(name, tuple(overrides), cfg))
    return Sweep(path, out_dir, tuple(axes), tuple(runs), vectorize, tuple(settings))


def short_names(keys):
    """Each dotted key's shortest tail that no other key ends with: lr, norm.eps, optim.eps."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[key] = "seed" if key == "run.seed" else tail
    return out


def _text(value):
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def run_name(overrides, short):
    """A deterministic, file-system-safe name, e.g. `placement=post,lr=0.003,seed=1`.

    Characters outside [A-Za-z0-9._+-] and runs of dots become '_'; when that changed a value,
    or the name is long, a hash of the exact overrides keeps names of distinct runs distinct.
    """
    if not overrides:
        return "base"
    parts, lossy = [], False
    for key, value in overrides:
        text = _text(value)
        safe = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._+-]", "_", text))
        lossy |= safe != text
        parts.append(f"{short[key]}={safe}")
    name = ",".join(parts)
    if lossy or len(name) > 120:
        digest = hashlib.sha1(json.dumps(overrides, default=str).encode()).hexdigest()[:8]
        name = f"{name[:110]}-{digest}"
    return name


def parse_shard(text):
    """'I/N' -> (I, N) with 1 <= I <= N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/8")
    return int(match[1]), int(match[2])


def shard_units(sweep, shard):
    """Every N-th unit of work, starting at the I-th: the shards partition the runs."""
    i, n = shard
    return [u for k, u in enumerate(sweep.units()) if k % n == i - 1]


def describe(sweep, shard):
    """The dry run: every run of this shard with its overrides, and the counts."""
    units = shard_units(sweep, shard)
    lines = []
    for k, unit in enumerate(units):
        for r in unit:
            sets = " ".join(f"{key}={_text(v)}" for key, v in r.overrides) or "(the base config)"
            group = f"[group {k + 1}] " if sweep.vectorize == "seeds" else ""
            lines.append(f"{group}{r.name}: {sets}")
    runs = sum(len(u) for u in units)
    shard_note = f" (shard {shard[0]}/{shard[1]} of {len(sweep.runs)})" if shard[1] > 1 else ""
    how = f" in {len(units)} vectorized group(s)" if sweep.vectorize == "seeds" else ""
    lines.append(f"{runs} runs{how}{shard_note} -> {sweep.out_dir}")
    return "\n".join(lines)


def read_manifest(sweep_dir):
    """A sweep directory's sweep.json, or None where `sweep_dir` is not a sweep's."""
    return read_json(os.path.join(sweep_dir, MANIFEST))


def _manifest(sweep):
    """sweep.json: every run of the sweep, started or not (for `normexp results`), and what
    makes them (the keys every run shares) to check a later invocation against."""
    swept = set(sweep.axes) | {"run.name", "run.out_dir"}
    base = {k: v for k, v in config_lib.flatten(sweep.runs[0].cfg).items() if k not in swept}
    return {"sweep_file": os.path.abspath(sweep.path), "axes": list(sweep.axes),
            "vectorize": sweep.vectorize, "settings": {k: v for k, v in sweep.settings},
            "base": base,
            "runs": [{"name": r.name, "overrides": dict(r.overrides)} for r in sweep.runs]}


def _changes(old, new):
    """What differs between two manifests' runs: added and removed runs, base keys."""
    before, after = [r["name"] for r in old["runs"]], [r["name"] for r in new["runs"]]
    changes = []
    for what, names in (("added", [n for n in after if n not in before]),
                        ("removed", [n for n in before if n not in after])):
        if names:
            changes.append(f"{len(names)} run(s) {what} ({', '.join(names[:3])}"
                           f"{', ...' if len(names) > 3 else ''})")
    overrides = {r["name"]: r["overrides"] for r in old["runs"]}
    moved = [r["name"] for r in new["runs"] if r["name"] in overrides
             and overrides[r["name"]] != r["overrides"]]
    if moved:
        changes.append(f"{len(moved)} run(s) with other values ({', '.join(moved[:3])})")
    a, b = old.get("base", {}), new["base"]  # keys both know: a newer normexp adds keys
    differ = [k for k in a if k in b and a[k] != b[k]]
    if differ:
        changes.append(f"the base config differs in {', '.join(differ[:6])}")
    return changes


def claim_directory(sweep, write=True):
    """Write sweep.json, or check the one there: a sweep directory holds one sweep's runs.

    Shards, workers and reruns all take their runs from the manifest that the first of them
    wrote (in its order), so a sweep file edited in between never makes a process train a run
    outside it or leave one of it behind: the edit is refused here, naming what changed.
    Returns the sweep with its runs in the manifest's order (without `write`, as for a dry
    run, only checks a manifest that is there)."""
    path = os.path.join(sweep.out_dir, MANIFEST)
    mine = json.loads(json.dumps(_manifest(sweep), default=str))  # as JSON reads it back
    if not write and not os.path.exists(path):
        return sweep
    if write:
        os.makedirs(sweep.out_dir, exist_ok=True)
    if not write or not create_once(path, json.dumps(mine, indent=1) + "\n"):
        theirs = read_json(path)
        if theirs is None:
            raise UsageError(f"{path}: unreadable; remove it to start this sweep afresh")
        changes = _changes(theirs, mine)
        if changes:
            raise UsageError(
                f"{path}: {sweep.path} no longer gives the runs this sweep directory was made "
                f"for: {'; '.join(changes)}. Run the edited file into a new directory "
                f"(--out), or remove {path} to make it this directory's sweep (finished runs "
                f"of the same name are kept)")
        order = {r["name"]: i for i, r in enumerate(theirs["runs"])}
        sweep = dataclasses.replace(sweep, runs=tuple(sorted(sweep.runs,
                                                             key=lambda r: order[r.name])))
    return sweep


def create_once(path, text):
    """Write `path` whole unless it exists; False if it did (one writer wins a race)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    write_atomic(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def run(sweep, *, shard=(1, 1), max_parallel=1, progress=True, wait=True):
    """Train this shard's runs until each is finished; returns the exit code (0; 1 if a run
    failed; 75 if runs are held by another process and not `wait`; 128 + signal on a stop).
    The rules are normexp.scheduler's."""
    from normexp import scheduler
    from normexp.stop import StopRequests
    sweep = claim_directory(sweep)
    with StopRequests() as stop:
        return scheduler.run(sweep, shard_units(sweep, shard), max_parallel=max_parallel,
                             progress=progress, wait=wait, stop=stop)
