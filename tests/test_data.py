import hashlib
import json
import os
import pickle
import sys
import threading

import numpy as np
import pytest

from normexp import data
from normexp.errors import UsageError

from conftest import ROOT, cli_in_process, normexp


def write_bins(directory, train, val, meta=None, dtype=np.uint16, meta_pkl=False):
    os.makedirs(directory, exist_ok=True)
    for name, ids in (("train", train), ("val", val)):
        ids = np.asarray(ids)
        assert ids.max() <= np.iinfo(dtype).max  # the helper itself must not wrap ids
        ids.astype(dtype).tofile(os.path.join(directory, f"{name}.bin"))
    if meta is not None and meta_pkl:
        with open(os.path.join(directory, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
    elif meta is not None:
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump(meta, f)


LLAMA3_VOCAB = 128256
# Ids a uint16 reading would mangle: above 65535, and the largest the vocabulary allows.
WIDE_TRAIN = (np.arange(100) * 1283) % LLAMA3_VOCAB
WIDE_TRAIN[:3] = [65536, 100000, LLAMA3_VOCAB - 1]
WIDE_VAL = (np.arange(40) * 3001 + 70000) % LLAMA3_VOCAB


def test_embedded_corpus_follows_the_recipe():
    from pydoc_data.topics import topics
    raw = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    corpus = data.load_corpus("", 0, 128)
    n = int(len(raw) * 0.9)
    assert corpus.vocab_size == 256
    np.testing.assert_array_equal(corpus.train, np.frombuffer(raw[:n], np.uint8))
    np.testing.assert_array_equal(corpus.val, np.frombuffer(raw[n:], np.uint8))
    assert corpus.fingerprint["bytes"] == len(raw)
    assert corpus.fingerprint["sha256"] == hashlib.sha256(raw).hexdigest()
    assert corpus.fingerprint["dtype"] == "uint8"


def test_stdlib_corpus_follows_its_recipe():
    """Every .py under the stdlib directory but tests and installed packages, in sorted
    relative-path order, as bytes; split and fingerprinted like the pydoc corpus."""
    import glob
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    names = sorted(os.path.relpath(f, root)
                   for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    names = [n for n in names if not skip & set(n.split(os.sep)[:-1])
             and not os.path.basename(n).startswith("test_")]
    raw = b"".join(open(os.path.join(root, n), "rb").read() for n in names)
    assert len(raw) > 5_000_000 and "unittest/case.py" in names and "os.py" in names
    corpus = data.load_corpus("", 0, 128, embedded="stdlib")
    n = int(len(raw) * 0.9)
    assert corpus.vocab_size == 256 and len(corpus.train) == n
    np.testing.assert_array_equal(corpus.val, np.frombuffer(raw[n:], np.uint8))
    assert corpus.fingerprint == {"source": f"python{sysconfig.get_python_version()} stdlib",
                                  "dtype": "uint8", "bytes": len(raw),
                                  "sha256": hashlib.sha256(raw).hexdigest()}


def test_unigram_entropy_is_the_entropy_of_the_training_tokens():
    tokens = np.array([0, 0, 1, 1, 2, 2, 2, 2], np.uint16)
    corpus = data.Corpus(tokens, tokens[:2], 256, {})
    expected = -2 * 0.25 * np.log(0.25) - 0.5 * np.log(0.5)
    assert corpus.unigram_entropy() == pytest.approx(expected)


def test_an_embedded_corpus_with_a_data_path_is_refused(tmp_path):
    from normexp.config import load
    from normexp.errors import UsageError
    assert load(None, ["data.corpus=stdlib"]).data.corpus == "stdlib"
    with pytest.raises(UsageError, match="data.corpus: 'stdlib' names an embedded corpus, but "
                                         "data.path="):
        load(None, ["data.corpus=stdlib", f"data.path={tmp_path}"])


def test_reads_the_nanogpt_format_written_by_the_shared_recipe(tmp_path):
    recipe = os.path.join(ROOT, "..", "shared", "pydoc_corpus.py")
    if not os.path.exists(recipe):
        pytest.skip("shared/pydoc_corpus.py is not beside this checkout")
    import subprocess
    subprocess.run([sys.executable, recipe, str(tmp_path)], check=True, capture_output=True)
    from_files = data.load_corpus(str(tmp_path), 0, 128)  # vocab from meta.pkl
    embedded = data.load_corpus("", 0, 128)
    assert from_files.vocab_size == 256
    np.testing.assert_array_equal(from_files.train, embedded.train)
    np.testing.assert_array_equal(from_files.val, embedded.val)


def test_batches_are_deterministic_in_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = data.batch(tokens, seed=1, step=5, batch_size=4, seq_len=8)
    b = data.batch(tokens, seed=1, step=5, batch_size=4, seq_len=8)
    c = data.batch(tokens, seed=1, step=6, batch_size=4, seq_len=8)
    d = data.batch(tokens, seed=2, step=5, batch_size=4, seq_len=8)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    inputs, targets = a
    assert inputs.shape == (4, 8) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # targets are shifted inputs
    np.testing.assert_array_equal(targets - inputs, 1)  # contiguous windows of the stream


def test_vocab_from_config_beats_meta(tmp_path):
    write_bins(tmp_path, np.arange(100) % 50, np.arange(40) % 50, meta={"vocab_size": 64})
    assert data.load_corpus(str(tmp_path), 0, 8).vocab_size == 64
    assert data.load_corpus(str(tmp_path), 50, 8).vocab_size == 50


@pytest.mark.parametrize("problem, fragment", [
    ("missing_val", "val.bin: missing"),
    ("odd_bytes", "train.bin: 201 bytes is not a whole number of uint16 tokens"),
    ("big_token", "train split holds token id 70 >= vocab size 64"),
    ("short", "val split has 5 tokens, fewer than data.seq_len + 1 = 9"),
    ("no_meta", "no meta.json or meta.pkl"),
    ("bad_meta", "meta.json: needs a positive integer 'vocab_size'"),
    ("not_dir", "is not a directory"),
])
def test_bad_data_gives_a_clear_error(tmp_path, problem, fragment):
    d = tmp_path / "d"
    meta = {"vocab_size": 64}
    train, val = np.arange(100) % 64, np.arange(40) % 64
    if problem == "missing_val":
        write_bins(d, train, val, meta)
        os.remove(d / "val.bin")
    elif problem == "odd_bytes":
        write_bins(d, train, val, meta)
        with open(d / "train.bin", "ab") as f:
            f.write(b"\x00")
    elif problem == "big_token":
        write_bins(d, np.append(train, 70), val, meta)
    elif problem == "short":
        write_bins(d, train, val[:5], meta)
    elif problem == "no_meta":
        write_bins(d, train, val)
    elif problem == "bad_meta":
        write_bins(d, train, val, {"vocab": 3})
    elif problem == "not_dir":
        d = tmp_path / "absent"
    with pytest.raises(UsageError) as err:
        data.load_corpus(str(d), 0, 8)
    assert fragment in str(err.value)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_meta_pkl_accepts_plain_data_and_refuses_code(tmp_path):
    plain = tmp_path / "meta.pkl"
    plain.write_bytes(pickle.dumps({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0},
                                    "chars": ["a"], "scale": 1.5}))
    assert data.read_meta_pkl(str(plain))["vocab_size"] == 65
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"vocab_size": Exploit()}))
    with pytest.raises(UsageError, match="refusing to load (posix|os).system"):
        data.read_meta_pkl(str(evil))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(UsageError, match="not a readable pickle"):
        data.read_meta_pkl(str(junk))


def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path):
    d = tmp_path / "d"
    write_bins(d, np.append(np.arange(100) % 64, 300), np.arange(40) % 64, {"vocab_size": 64})
    out = tmp_path / "run"
    result = normexp("train", f"data.path={d}", f"run.out_dir={out}", "data.seq_len=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "token id 300 >= vocab size 64" in result.stderr and not out.exists()


def test_uint32_ids_load_with_the_dtype_from_meta(tmp_path):
    meta = {"vocab_size": LLAMA3_VOCAB, "dtype": "uint32"}
    write_bins(tmp_path, WIDE_TRAIN, WIDE_VAL, meta, dtype=np.uint32)
    corpus = data.load_corpus(str(tmp_path), 0, 8)
    assert corpus.vocab_size == LLAMA3_VOCAB and corpus.train.dtype == np.uint32
    assert len(corpus.train) == 100 and len(corpus.val) == 40
    np.testing.assert_array_equal(corpus.train, WIDE_TRAIN)
    np.testing.assert_array_equal(corpus.val, WIDE_VAL)
    assert corpus.fingerprint["bytes"] == 4 * 140 == os.path.getsize(tmp_path / "train.bin") + \
        os.path.getsize(tmp_path / "val.bin")
    assert corpus.fingerprint["dtype"] == "uint32"
    inputs, targets = data.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=8)
    assert inputs.max() < LLAMA3_VOCAB and set(inputs.ravel()) <= set(WIDE_TRAIN)
    # data.vocab_size overrides the meta's vocab_size, but the width still comes from the meta
    corpus = data.load_corpus(str(tmp_path), 130000, 8)
    assert corpus.vocab_size == 130000 and len(corpus.train) == 100
    np.testing.assert_array_equal(corpus.train, WIDE_TRAIN)


def test_meta_pkl_carries_the_dtype_too(tmp_path):
    meta = {"vocab_size": LLAMA3_VOCAB, "dtype": "uint32", "itos": {0: "a"}}
    write_bins(tmp_path, WIDE_TRAIN, WIDE_VAL, meta, dtype=np.uint32, meta_pkl=True)
    corpus = data.load_corpus(str(tmp_path), 0, 8)
    np.testing.assert_array_equal(corpus.val, WIDE_VAL)
    assert corpus.vocab_size == LLAMA3_VOCAB and corpus.fingerprint["dtype"] == "uint32"
    del meta["dtype"]  # nanoGPT's own meta.pkl: uint16, which cannot hold this vocabulary
    write_bins(tmp_path, WIDE_TRAIN, WIDE_VAL, meta, dtype=np.uint32, meta_pkl=True)
    with pytest.raises(UsageError, match=r"meta\.pkl: vocab_size 128256 is more token ids than "
                                         r"uint16 holds \(65536\); .*'dtype': 'uint32'"):
        data.load_corpus(str(tmp_path), 0, 8)


def test_uint16_reads_as_before_and_its_whole_range_fits(tmp_path):
    ids = np.arange(100) * 661 % 65536
    ids[0] = 65535
    for meta in ({"vocab_size": 65536}, {"vocab_size": 65536, "dtype": "uint16"}):
        write_bins(tmp_path, ids, ids[:40], meta)
        corpus = data.load_corpus(str(tmp_path), 0, 8)
        assert corpus.train.dtype == np.uint16 and len(corpus.train) == 100
        np.testing.assert_array_equal(corpus.train, ids)
        assert corpus.fingerprint["bytes"] == 2 * 140 and corpus.fingerprint["dtype"] == "uint16"
    write_bins(tmp_path, ids, ids[:40], {"vocab_size": 65537})
    with pytest.raises(UsageError, match="vocab_size 65537 is more token ids than uint16"):
        data.load_corpus(str(tmp_path), 0, 8)


@pytest.mark.parametrize("problem, fragment", [
    ("bad_dtype", "meta.json: 'dtype' must be one of 'uint16', 'uint32' "
                  "(the width of the token ids in train.bin/val.bin), got 'int32'"),
    ("numeric_dtype", "meta.json: 'dtype' must be one of 'uint16', 'uint32'"),
    ("bad_dtype_config_vocab", "meta.json: 'dtype' must be one of 'uint16', 'uint32'"),
    ("not_a_mapping", "meta.json: expected a mapping like"),
    ("ragged_uint32", "train.bin: 402 bytes is not a whole number of uint32 tokens "
                      "(4 bytes each)"),
    ("no_dtype", "meta.json: vocab_size 128256 is more token ids than uint16 holds (65536); "
                 "if the .bin files hold uint32 ids, write \"dtype\": \"uint32\" in meta.json"),
    ("no_meta", "train.bin (read as uint16: no meta.json): data.vocab_size 128256 is more "
                "token ids than uint16 holds (65536)"),
    ("beyond_uint32", "meta.json: vocab_size 4294967297 is more token ids than uint32 holds "
                      "(4294967296); no dtype holds more; fix vocab_size"),
])
def test_a_dtype_that_disagrees_with_the_data_is_an_error(tmp_path, problem, fragment):
    meta, dtype, vocab = {"vocab_size": LLAMA3_VOCAB, "dtype": "uint32"}, np.uint32, 0
    if problem == "bad_dtype":
        meta["dtype"] = "int32"
    elif problem == "numeric_dtype":
        meta["dtype"] = 32
    elif problem == "bad_dtype_config_vocab":
        meta, vocab = {"dtype": "float32"}, LLAMA3_VOCAB
    elif problem == "not_a_mapping":
        meta = [LLAMA3_VOCAB]
    elif problem == "no_dtype":
        del meta["dtype"]
    elif problem == "no_meta":
        meta, vocab = None, LLAMA3_VOCAB
    elif problem == "beyond_uint32":
        meta["vocab_size"] = 2**32 + 1
    write_bins(tmp_path, WIDE_TRAIN, WIDE_VAL, meta, dtype=dtype)
    if problem == "ragged_uint32":
        with open(tmp_path / "train.bin", "ab") as f:
            f.write(b"\x00\x00")
    with pytest.raises(UsageError) as err:
        data.load_corpus(str(tmp_path), vocab, 8)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path) in str(err.value)  # the full path of the file at fault


@pytest.mark.parametrize("with_meta", [True, False])
def test_cli_uint32_files_read_as_uint16_exit_2(tmp_path, with_meta):
    d, out = tmp_path / "d", tmp_path / "run"
    write_bins(d, WIDE_TRAIN, WIDE_VAL, {"vocab_size": LLAMA3_VOCAB} if with_meta else None,
               dtype=np.uint32)
    args = [] if with_meta else [f"data.vocab_size={LLAMA3_VOCAB}"]
    result = cli_in_process("train", f"data.path={d}", f"run.out_dir={out}", "data.seq_len=8",
                            *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    at_fault = d / ("meta.json" if with_meta else "train.bin")
    assert lines[0].startswith(f"normexp: error: {at_fault}") and "uint32" in lines[0]
    assert not out.exists()


def windows(tokens, seed=0):
    return lambda step: data.batch(tokens, seed=seed, step=step, batch_size=2, seq_len=8)


def test_prefetcher_yields_the_batches_of_each_step_in_order():
    tokens = np.arange(5000, dtype=np.uint16)
    prefetch = data.Prefetcher(windows(tokens, seed=3), start=7)
    try:
        for step in range(7, 12):
            x, y = next(prefetch)
            ex, ey = data.batch(tokens, seed=3, step=step, batch_size=2, seq_len=8)
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
    finally:
        prefetch.close()
    assert not any(t.name.startswith("normexp-prefetch") for t in threading.enumerate())


def test_prefetcher_raises_the_producers_error_in_the_consumer():
    prefetch = data.Prefetcher(windows(np.arange(5, dtype=np.uint16)), start=0)
    # windows longer than the stream
    with pytest.raises(ValueError):
        next(prefetch)
    with pytest.raises(ValueError):  # again, rather than waiting forever
        next(prefetch)
    prefetch.close()
    closed = _closed_prefetcher()
    with pytest.raises(RuntimeError, match="closed"):
        next(closed)


def _closed_prefetcher():
    prefetch = data.Prefetcher(windows(np.arange(5000, dtype=np.uint16)), start=0)
    prefetch.close()
    return prefetch


def test_prefetcher_close_never_waits_for_work_it_has_not_started():
    started, release, calls = threading.Event(), threading.Event(), []

    def slow(step):
        calls.append(step)
        started.set()
        release.wait(10)  # bounds the test only if close failed to cancel the queued ones
        return step

    prefetch = data.Prefetcher(slow, start=0, put=lambda x: x, depth=3)
    assert started.wait(60)
    queued = list(prefetch.pending)[1:]  # steps 1 and 2, behind the one in progress
    cancelled = []

    def on_done(future):  # the one in progress finishes once close has cancelled the others
        cancelled.append(future.cancelled())
        if len(cancelled) == len(queued):
            release.set()

    for future in queued:
        future.add_done_callback(on_done)
    prefetch.close()
    assert calls == [0] and cancelled == [True, True]  # one sample, not three
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetch)
