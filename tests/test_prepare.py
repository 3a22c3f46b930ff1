"""`normexp prepare`: text, JSONL and Parquet inputs, bytes / BPE / tokenizer.json, streamed."""

import json
import os

import numpy as np
import pytest

from normexp import data
from normexp.errors import UsageError
from normexp.prepare import EOT, prepare

from conftest import cli_in_process, normexp

TEXTS = [f"Layer normalization number {i} keeps the residual stream in scale. " * (1 + i % 3)
         for i in range(60)]


def write(directory, name, text):
    (directory / name).write_text(text)
    return directory / name


def files(directory):
    return {f: (directory / f).read_bytes() for f in sorted(os.listdir(directory))}


def test_bytes_of_a_text_file_are_its_bytes_split_ninety_ten(tmp_path):
    text = tmp_path / "input.txt"
    text.write_bytes("héllo normalization ".encode() * 50 + b"\xff")  # not UTF-8 at the end
    result = normexp("prepare", str(text), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "train.bin 945 tokens, val.bin 106 tokens, vocab 256 (bytes, uint16)" in result.stdout
    corpus = data.load_corpus(str(tmp_path / "out"), 0, 16)
    ids = np.concatenate([corpus.train, corpus.val])
    assert bytes(ids.astype(np.uint8)) == text.read_bytes() and corpus.vocab_size == 256
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "bytes"
    assert meta["sources"] == [str(text)] and (meta["train_tokens"], meta["val_tokens"]) == (945,
                                                                                            106)
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]


def write_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                             for i, t in enumerate(TEXTS[:30])))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": TEXTS[30:], "n": list(range(30))}), parquet,
                   row_group_size=7)
    return str(jsonl), str(parquet)


def test_bpe_trained_on_jsonl_and_parquet_decodes_back_and_is_deterministic(tmp_path):
    from tokenizers import Tokenizer
    inputs = write_inputs(tmp_path)
    first = prepare(inputs, str(tmp_path / "one"), tokenizer="bpe:300", val_fraction=0.2)
    prepare(inputs, str(tmp_path / "two"), tokenizer="bpe:300", val_fraction=0.2)
    assert files(tmp_path / "one") == files(tmp_path / "two")  # same inputs, same files
    assert first["vocab_size"] == 300 and first["dtype"] == "uint16"
    assert first["train_tokens"] == int(0.8 * (first["train_tokens"] + first["val_tokens"]))
    tokenizer = Tokenizer.from_file(str(tmp_path / "one" / "tokenizer.json"))
    corpus = data.load_corpus(str(tmp_path / "one"), 0, 16)
    ids = np.concatenate([corpus.train, corpus.val]).tolist()
    eot = tokenizer.token_to_id(EOT)
    assert first["eot_id"] == eot and ids.count(eot) == len(TEXTS)  # one after every record
    assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(t + EOT for t in TEXTS)
    assert len(ids) < sum(len(t) for t in TEXTS) / 2  # merges learned: fewer ids than bytes
    # the saved tokenizer, loaded back, gives the same ids
    again = prepare(inputs, str(tmp_path / "three"), tokenizer=str(
        tmp_path / "one" / "tokenizer.json"), val_fraction=0.2)
    assert again["tokenizer"] == "tokenizer.json"
    assert files(tmp_path / "three") == files(tmp_path / "one") | {
        "meta.json": (tmp_path / "three" / "meta.json").read_bytes()}


def test_a_vocabulary_past_65536_writes_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(0, 70000, 997)))
    meta = prepare([str(text)], str(tmp_path / "out"), tokenizer=str(tmp_path / "tokenizer.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    corpus = data.load_corpus(str(tmp_path / "out"), 0, 4)
    assert corpus.train.dtype == np.uint32
    assert np.concatenate([corpus.train, corpus.val]).tolist() == list(range(0, 70000, 997))


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d / "missing.txt", [], "missing.txt: cannot read (No such file or directory)"),
    (lambda d: write(d, "empty.txt", ""), [],
     "0 tokens is too little to split"),
    (lambda d: write(d, "x.jsonl", '{"text": "a"}\n{"body": "b"}\n'),
     [], "x.jsonl:2: no text field 'text' (--field); the record has body"),
    (lambda d: write(d, "y.jsonl", '{"text": "a"}\nnot json\n'), [],
     "y.jsonl:2: not a JSON object"),
    (lambda d: write(d, "z.txt", "some text " * 10),
     ["--tokenizer", "bpe:10"], "--tokenizer bpe:10: expected bpe:N with N >= 258"),
    (lambda d: write(d, "z.txt", "some text " * 10),
     ["--tokenizer", "wordpiece"], "--tokenizer 'wordpiece': expected bytes, bpe:N or"),
    (lambda d: write(d, "z.txt", "some text " * 10),
     ["--val-fraction", "1"], "--val-fraction: must be in (0, 1), got 1.0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, make, args, message):
    source = make(tmp_path)
    out = tmp_path / "out"
    result = cli_in_process("prepare", str(source), str(out), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_a_parquet_file_without_the_field_and_an_existing_output_left_as_it_was(tmp_path):
    _, parquet = write_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"old")
    with pytest.raises(UsageError, match="b.parquet: no column 'body' .--field.; it has text, n"):
        prepare([parquet], str(out), field="body")
    assert files(out) == {"train.bin": b"old"}
