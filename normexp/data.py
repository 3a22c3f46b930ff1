"""Token streams and batches: an embedded corpus (Python's pydoc topics, or its standard
library's source), or nanoGPT-format train.bin/val.bin.

A batch is B random windows of T+1 tokens; the windows depend only on (seed, step), so a
resumed run sees exactly the batches the uninterrupted run saw, and two runs that differ only
in their model see identical data.
"""

import collections
import concurrent.futures
import functools
import hashlib
import io
import json
import os
import pickle
import sysconfig
from dataclasses import dataclass

import jax
import numpy as np

from normexp.errors import UsageError

TRAIN_FRACTION = 0.9
BYTE_VOCAB = 256
# The width of the ids in train.bin/val.bin, named by meta's "dtype"; uint16 when absent, as in
# nanoGPT. The files carry no header, so a wrong width reads as plausible garbage: it is checked.
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DEFAULT_DTYPE = "uint16"


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # 1-D token ids (a memmap for user data)
    val: np.ndarray
    vocab_size: int
    fingerprint: dict  # source, dtype, bytes (of the files), sha256

    def unigram_entropy(self):
        """Of the training tokens (nats): the loss of a model that ignores the context."""
        counts = np.bincount(np.asarray(self.train), minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def pydoc_bytes():
    """Python's own pydoc topics, sorted by key, joined, UTF-8: the embedded default corpus."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


# left out of the stdlib corpus: tests, and packages installed into the stdlib directory
STDLIB_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")


@functools.lru_cache(maxsize=1)
def stdlib_bytes():
    """The `.py` files of Python's standard library (sysconfig's 'stdlib' directory) in sorted
    relative-path order, concatenated: directories in STDLIB_SKIP and files test_*.py left
    out. ~12 MB on Python 3.11; it depends on the Python version, which the fingerprint
    records."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if n.endswith(".py") and not n.startswith("test_")]
    parts = []
    for name in sorted(files):
        try:
            with open(os.path.join(root, name), "rb") as f:
                parts.append(f.read())
        except OSError as e:
            raise UsageError(f"data.corpus=stdlib: cannot read {os.path.join(root, name)} "
                             f"({e.strerror}); use data.corpus=pydoc or data.path") from None
    return b"".join(parts)


EMBEDDED = {"pydoc": (pydoc_bytes, "pydoc_data.topics"),
            "stdlib": (stdlib_bytes, "python{} stdlib".format(sysconfig.get_python_version()))}


def split_bytes(raw):
    data = np.frombuffer(raw, dtype=np.uint8)
    n = int(len(data) * TRAIN_FRACTION)
    return data[:n], data[n:]


def corpus_of(data_cfg):
    """The corpus a config's `data` section names."""
    return load_corpus(data_cfg.path, data_cfg.vocab_size, data_cfg.seq_len, data_cfg.corpus)


def load_corpus(path, vocab_size, seq_len, embedded="pydoc"):
    """The corpus of `data.path` (empty = the `embedded` one, by name), checked against vocab
    and window length."""
    if not path:
        read, source = EMBEDDED[embedded]
        raw = read()
        train, val = split_bytes(raw)
        vocab = vocab_size or BYTE_VOCAB
        fingerprint = {"source": source, "dtype": "uint8", "bytes": len(raw),
                       "sha256": hashlib.sha256(raw).hexdigest()}
    else:
        if not os.path.isdir(path):
            raise UsageError(f"data.path: {path!r} is not a directory "
                             f"(expected one holding train.bin and val.bin)")
        # The meta comes first even when data.vocab_size is set: only it says how wide an id is.
        meta_file, meta = _read_meta(path)
        dtype = _meta_dtype(meta_file, meta)
        vocab = vocab_size or _meta_vocab(path, meta_file, meta)
        train, val = (_read_bin(os.path.join(path, f"{s}.bin"), dtype) for s in ("train", "val"))
        _check_vocab_fits(vocab, dtype, meta_file, path, from_config=bool(vocab_size))
        digest = hashlib.sha256()
        for split in (train, val):
            digest.update(np.ascontiguousarray(split).view(np.uint8))
        fingerprint = {"source": os.path.abspath(path), "dtype": dtype,
                       "bytes": train.nbytes + val.nbytes, "sha256": digest.hexdigest()}
    for name, split in (("train", train), ("val", val)):
        if len(split) < seq_len + 1:
            raise UsageError(f"{name} split has {len(split)} tokens, fewer than data.seq_len + 1 "
                             f"= {seq_len + 1}; lower data.seq_len or add data")
        top = int(split.max())
        if top >= vocab:
            raise UsageError(f"{name} split holds token id {top} >= vocab size {vocab}; "
                             f"set data.vocab_size or fix meta.json")
    return Corpus(train, val, vocab, fingerprint)


def _read_bin(file, dtype):
    if not os.path.isfile(file):
        raise UsageError(f"{file}: missing (a data directory needs train.bin and val.bin, token "
                         f"ids of meta.json's \"dtype\", {DEFAULT_DTYPE} by default; "
                         f"`normexp prepare INPUT... OUT_DIR` writes them)")
    size, width = os.path.getsize(file), np.dtype(DTYPES[dtype]).itemsize
    if size % width:
        raise UsageError(f"{file}: {size} bytes is not a whole number of {dtype} tokens "
                         f"({width} bytes each); check \"dtype\" in meta.json")
    if size == 0:
        raise UsageError(f"{file}: is empty")
    return np.memmap(file, dtype=DTYPES[dtype], mode="r")


def _read_meta(path):
    """(file, dict) from meta.json, else meta.pkl; (None, {}) when the directory has neither."""
    meta_json, meta_pkl = os.path.join(path, "meta.json"), os.path.join(path, "meta.pkl")
    if os.path.isfile(meta_json):
        try:
            with open(meta_json) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{meta_json}: invalid JSON ({e})") from None
        except OSError as e:
            raise UsageError(f"{meta_json}: cannot read ({e.strerror})") from None
        source = meta_json
    elif os.path.isfile(meta_pkl):
        meta, source = read_meta_pkl(meta_pkl), meta_pkl
    else:
        return None, {}
    if not isinstance(meta, dict):
        raise UsageError(f"{source}: expected a mapping like {{\"vocab_size\": N, \"dtype\": "
                         f"\"{DEFAULT_DTYPE}\"}}, got {type(meta).__name__}")
    return source, meta


def _meta_dtype(source, meta):
    dtype = meta.get("dtype", DEFAULT_DTYPE)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UsageError(f"{source}: 'dtype' must be one of {', '.join(map(repr, DTYPES))} "
                         f"(the width of the token ids in train.bin/val.bin), got {dtype!r}")
    return dtype


def _meta_vocab(path, source, meta):
    if source is None:
        raise UsageError(f"{path}: no meta.json or meta.pkl to read the vocabulary size from; "
                         f"set data.vocab_size")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise UsageError(f"{source}: needs a positive integer 'vocab_size', got {vocab!r}")
    return vocab


def _check_vocab_fits(vocab, dtype, meta_file, path, *, from_config):
    """A vocabulary wider than the ids is the mark of files written in a wider dtype."""
    capacity = 1 << (8 * np.dtype(DTYPES[dtype]).itemsize)
    if vocab <= capacity:
        return
    origin = "data.vocab_size" if from_config else "vocab_size"
    where = meta_file or f"{os.path.join(path, 'train.bin')} (read as {dtype}: no meta.json)"
    if dtype == "uint32":
        fix = f"no dtype holds more; fix {origin}"
    elif meta_file and meta_file.endswith(".pkl"):
        fix = ("if the .bin files hold uint32 ids, add 'dtype': 'uint32' to meta.pkl or write "
               "a meta.json with vocab_size and \"dtype\": \"uint32\"")
    else:
        fix = "if the .bin files hold uint32 ids, write \"dtype\": \"uint32\" in meta.json"
    raise UsageError(f"{where}: {origin} {vocab} is more token ids than {dtype} holds "
                     f"({capacity}); {fix}")


class _PlainUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars: any class or function lookup is refused."""

    def find_class(self, module, name):
        raise UsageError(f"refusing to load {module}.{name}: meta.pkl may hold only dicts, "
                         f"lists, strings and numbers (write a meta.json instead)")


def read_meta_pkl(file):
    try:
        with open(file, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UsageError(f"{file}: cannot read ({e.strerror})") from None
    try:
        meta = _PlainUnpickler(io.BytesIO(blob)).load()
    except UsageError as e:
        raise UsageError(f"{file}: {e}") from None
    except Exception as e:  # a truncated or foreign file: any unpickling failure is bad data
        raise UsageError(f"{file}: not a readable pickle ({type(e).__name__}: {e})") from None
    return meta


TRAIN_STREAM, VAL_STREAM = 0, 1


def batch(tokens, *, seed, step, batch_size, seq_len, stream=TRAIN_STREAM):
    """(inputs, targets), each int32 [B, T]: B windows whose starts depend on (seed, step)."""
    rng = np.random.default_rng([seed, stream, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    window = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return window[:, :-1], window[:, 1:]


class Prefetcher:
    """Training batches for steps start, start+1, ... on the device, `depth` steps ahead.

    `sample(step)` makes a step's host arrays and `put` moves them to the devices. One worker
    thread does both while the device runs the current step (double buffering), so the step
    never waits for the host. The order is the order of steps, so what a run sees stays a
    function of (seed, step). A producer's error is raised in the consumer, at that step's
    `next` and every later one; `close` cancels what has not started and never hangs.
    """

    def __init__(self, sample, *, start, put=jax.device_put, depth=2):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "normexp-prefetch")
        self.make = lambda step: put(sample(step))
        self.next_step = start
        self.pending = collections.deque()
        self.error = None
        for _ in range(depth):
            self._submit()

    def _submit(self):
        self.pending.append(self.pool.submit(self.make, self.next_step))
        self.next_step += 1

    def __next__(self):
        if self.error is not None:
            raise self.error
        if not self.pending:
            raise RuntimeError("Prefetcher is closed")
        future = self.pending[0]
        try:
            item = future.result()
        except BaseException as e:
            if future.done() and future.exception() is e:  # the producer's, not an interrupt
                self.error = e  # raised again at every later call, never a wait
            raise
        self.pending.popleft()
        self._submit()
        return item

    def close(self):
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def eval_batches(tokens, *, seed, count, batch_size, seq_len):
    """The fixed validation batches: the same windows at every evaluation of a run."""
    return [batch(tokens, seed=seed, step=i, batch_size=batch_size, seq_len=seq_len,
                  stream=VAL_STREAM) for i in range(count)]

