"""`normexp prepare`: your own text as nanoGPT's train.bin/val.bin, tokenized and streamed.

Inputs are text files (read in 1 MiB pieces, each file one document), JSONL (one JSON object
per line, its text under `field`) or Parquet (the `field` column, a record batch at a time):
never the whole corpus in memory. Tokenizers:

- `bytes`: the UTF-8 bytes, vocabulary 256 (a JSONL or Parquet record ends with a newline);
- `bpe:N`: a byte-level BPE of N tokens trained on the inputs with Hugging Face `tokenizers`
  (offline), `<|endoftext|>` after every document;
- `PATH/tokenizer.json`: an existing tokenizer (`<|endoftext|>` after each document when it
  has that token).

The ids go to one file in the output's private temporary directory; the last `val_fraction`
of them becomes val.bin, the rest train.bin (uint16, or uint32 past 65536 tokens), beside
meta.json and the tokenizer itself (tokenizer.json), moved into place only once all are
written. The same inputs give the same files.
"""

import codecs
import json
import os
import shutil
import sys
import time

import numpy as np

from normexp.errors import UsageError

PIECE = 1 << 20  # bytes of a text file read at once
BATCH = 1 << 22  # characters tokenized in one call
EOT = "<|endoftext|>"


def _reader(path):
    """The kind of an input file by its extension: text, jsonl or parquet."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def check_inputs(paths, field):
    """Fail before anything is written: every input readable, Parquet columns present."""
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror})") from None
        if _reader(path) == "parquet":
            columns = _parquet(path).schema_arrow.names
            if field not in columns:
                raise UsageError(f"{path}: no column {field!r} (--field); it has "
                                 f"{', '.join(columns)}")


def _parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install "
                         f"'normexp[parquet]')") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types: a file that is not Parquet
        raise UsageError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") \
            from None


def documents(paths, field, errors):
    """(text, end, input bytes consumed) in order over every input; `end` is "record" after a
    JSONL or Parquet record, "file" after a text file, else None."""
    for path in paths:
        kind = _reader(path)
        if kind == "text":
            decoder = codecs.getincrementaldecoder("utf-8")(errors)
            with open(path, "rb") as f:
                while piece := f.read(PIECE):
                    yield decoder.decode(piece), None, len(piece)
            yield decoder.decode(b"", final=True), "file", 0
        elif kind == "jsonl":
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        yield "", None, len(line)
                        continue
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise UsageError(f"{path}:{number}: not a JSON object ({e})") from None
                    text = record.get(field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        has = (", ".join(sorted(record)[:8]) if isinstance(record, dict)
                               else type(record).__name__)
                        raise UsageError(f"{path}:{number}: no text field {field!r} (--field)"
                                         f"; the record has {has}")
                    yield text, "record", len(line)
        else:
            source = _parquet(path)
            for batch in source.iter_batches(columns=[field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield text or "", "record", len((text or "").encode("utf-8", errors))


class Tokens:
    """A tokenizer by its command-line name: `encode(texts, ends)` -> ids, `vocab_size`,
    `name`, and `save(directory)` for the tokenizers that are files."""

    def __init__(self, spec, paths, field, progress):
        self.spec, self.hf = spec, None
        if spec == "bytes":
            self.vocab_size, self.name = 256, "bytes"
            return
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise UsageError(f"--tokenizer {spec}: needs the Hugging Face tokenizers library "
                             f"(pip install tokenizers)") from None
        if spec.startswith("bpe:"):
            size = spec[4:]
            if not size.isdigit() or int(size) < 258:
                raise UsageError(f"--tokenizer {spec}: expected bpe:N with N >= 258 (the 256 "
                                 f"bytes, {EOT} and at least one merge)")
            self.hf = Tokenizer(models.BPE())
            self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=int(size), special_tokens=[EOT],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False)
            texts = (text for text, _, _ in _with_progress(
                documents(paths, field, "replace"), paths, progress, "training BPE"))
            self.hf.train_from_iterator(texts, trainer)
            self.name = spec
        elif os.path.isfile(spec):
            try:
                self.hf = Tokenizer.from_file(spec)
            except Exception as e:  # tokenizers raises a bare Exception for a bad file
                raise UsageError(f"--tokenizer {spec}: not a tokenizer.json ({e})") from None
            self.name = "tokenizer.json"
        else:
            raise UsageError(f"--tokenizer {spec!r}: expected bytes, bpe:N or the path of a "
                             f"tokenizer.json")
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.eot = self.hf.token_to_id(EOT)

    def encode(self, texts, ends):
        """The ids of consecutive pieces of text and what each ends (see `documents`)."""
        if self.hf is None:
            joined = "".join(t + ("\n" if end == "record" else "") for t, end in zip(texts, ends))
            return np.frombuffer(joined.encode("utf-8", "surrogateescape"), np.uint8)
        out = []
        for encoding, end in zip(self.hf.encode_batch(texts, add_special_tokens=False), ends):
            out.extend(encoding.ids)
            if end and self.eot is not None:
                out.append(self.eot)
        return np.asarray(out, np.int64)

    def save(self, directory):
        if self.hf is not None:
            self.hf.save(os.path.join(directory, "tokenizer.json"))


def _with_progress(items, paths, progress, what):
    from tqdm import tqdm
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=not progress,
              file=sys.stderr) as bar:
        for item in items:
            bar.update(item[2])
            yield item


def prepare(paths, out_dir, *, tokenizer="bytes", field="text", val_fraction=0.1,
            progress=False):
    """Tokenize `paths` into `out_dir`; returns meta.json's contents (with tokens_per_s)."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: is a file, expected an output directory")
    check_inputs(paths, field)
    t0 = time.perf_counter()
    tokens = Tokens(tokenizer, paths, field, progress)
    dtype = np.uint16 if tokens.vocab_size <= 1 << 16 else np.uint32
    created = not os.path.exists(out_dir)
    tmp = os.path.join(out_dir, f".prepare-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        count = _write_ids(tokens, paths, field, os.path.join(tmp, "ids.bin"), dtype, progress)
        if count < 20:
            raise UsageError(f"{', '.join(paths)}: {count} tokens is too little to split into "
                             f"train and val")
        n_train = int(count * (1 - val_fraction))
        _split(os.path.join(tmp, "ids.bin"), n_train, dtype, tmp)
        tokens.save(tmp)
        meta = {"vocab_size": tokens.vocab_size, "dtype": np.dtype(dtype).name,
                "tokenizer": tokens.name, "sources": [os.path.abspath(p) for p in paths],
                "field": field, "val_fraction": val_fraction, "train_tokens": n_train,
                "val_tokens": count - n_train}
        if tokens.hf is not None:
            meta["eot_id"] = tokens.eot
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
    meta["tokens_per_s"] = round(count / (time.perf_counter() - t0), 1)
    return meta


def _write_ids(tokens, paths, field, target, dtype, progress):
    """Every input's ids appended to `target`, tokenized BATCH characters at a time."""
    errors = "surrogateescape" if tokens.hf is None else "replace"
    count, texts, ends, size = 0, [], [], 0
    with open(target, "wb") as out:
        def flush():
            nonlocal count, texts, ends, size
            if texts:
                ids = tokens.encode(texts, ends)
                ids.astype(dtype).tofile(out)
                count += len(ids)
            texts, ends, size = [], [], 0
        for text, end, _ in _with_progress(documents(paths, field, errors), paths, progress,
                                           "tokenizing"):
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH:
                flush()
        flush()
    return count


def _split(ids_file, n_train, dtype, directory):
    """ids.bin -> train.bin (its first n_train ids, in place) and val.bin (the rest)."""
    width = np.dtype(dtype).itemsize
    with open(ids_file, "rb") as source, open(os.path.join(directory, "val.bin"), "wb") as val:
        source.seek(n_train * width)
        shutil.copyfileobj(source, val, PIECE)
    os.truncate(ids_file, n_train * width)
    os.replace(ids_file, os.path.join(directory, "train.bin"))
