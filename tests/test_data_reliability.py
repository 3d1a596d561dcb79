"""Issue 13, data half: damaged or mismatched indexes, null and mistyped text, over-long documents, a full
disk during `prepare`, a missing prefix and an empty evaluation split. Each is a clear DataError naming the
file (and the entry, row or split), or a documented, counted behaviour."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megalite.data.clean import CleanConfig
from megalite.data.indexed import HEADER_SIZE, IndexedDataset, IndexedDatasetWriter
from megalite.data.prepare import prepare
from megalite.errors import DataError
from tests.test_data_prepare import expected_ids, make_docs, tokenizer_file  # noqa: F401 - a shared fixture


def _raises(fn, *words: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{msg!r} does not name {w!r}"
    return msg


# ------------------------------------------------------------------ item 5: the index body is checked at open


def _copy_prefix(src: Path, dst: Path, manifest: bool = True) -> Path:
    for ext in (".idx", ".bin") + ((".json",) if manifest else ()):
        shutil.copyfile(f"{src}{ext}", f"{dst}{ext}")
    return dst


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_index_body_is_checked_against_itself_the_bin_and_the_manifest(tmp_path: Path, tokenizer_file: str):  # noqa: F811
    docs = make_docs(30, seed=5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    good = tmp_path / "good"
    m = prepare([str(tmp_path / "in.jsonl")], str(good), tokenizer=tokenizer_file)
    s = m["num_documents"]
    ds = IndexedDataset(good)  # the good one opens
    lengths = ds.sequence_lengths.copy()
    len_at = lambda i: HEADER_SIZE + 4 * i  # noqa: E731
    ptr_at = lambda i: HEADER_SIZE + 4 * s + 8 * i  # noqa: E731
    doc_at = lambda i: HEADER_SIZE + 12 * s + 8 * i  # noqa: E731

    # Garbage in the body (header intact): lengths and pointers are random.
    p = _copy_prefix(good, tmp_path / "garbage")
    _poke(p.with_suffix(".idx"), HEADER_SIZE, np.random.default_rng(0).bytes(12 * s))
    _raises(lambda: IndexedDataset(p), "garbage.idx", "sequence 0")
    # A negative length; a zero length.
    p = _copy_prefix(good, tmp_path / "negative")
    _poke(p.with_suffix(".idx"), len_at(3), struct.pack("<i", -5))
    _raises(lambda: IndexedDataset(p), "negative.idx", "sequence 3 has length -5")
    p = _copy_prefix(good, tmp_path / "zero")
    _poke(p.with_suffix(".idx"), len_at(7), struct.pack("<i", 0))
    _raises(lambda: IndexedDataset(p), "zero.idx", "sequence 7 has length 0")
    # A pointer off by one token; lengths swapped between neighbours (each pointer after them moves).
    p = _copy_prefix(good, tmp_path / "pointer")
    _poke(p.with_suffix(".idx"), ptr_at(11), struct.pack("<q", int(ds.sequence_pointers[11]) + 2))
    _raises(lambda: IndexedDataset(p), "pointer.idx", "sequence 11 points at byte")
    p = _copy_prefix(good, tmp_path / "swapped")
    i = int(np.flatnonzero(lengths[:-1] != lengths[1:])[0])
    _poke(p.with_suffix(".idx"), len_at(i), struct.pack("<ii", int(lengths[i + 1]), int(lengths[i])))
    _raises(lambda: IndexedDataset(p), "swapped.idx", f"sequence {i + 1} points at byte")
    # Document indices that do not increase, or do not start at 0.
    p = _copy_prefix(good, tmp_path / "docs")
    _poke(p.with_suffix(".idx"), doc_at(5), struct.pack("<q", 4))
    _raises(lambda: IndexedDataset(p), "docs.idx", "document index 5 is 4")
    p = _copy_prefix(good, tmp_path / "docs0")
    _poke(p.with_suffix(".idx"), doc_at(0), struct.pack("<q", 1))
    _raises(lambda: IndexedDataset(p), "docs0.idx", "document index 0")
    # The dtype byte: uint16 -> int16 keeps every offset (only the manifest can tell); -> int32 moves them.
    p = _copy_prefix(good, tmp_path / "dtype")
    _poke(p.with_suffix(".idx"), 17, bytes([3]))
    _raises(lambda: IndexedDataset(p), "dtype.idx", "int16", "dtype.json", "'uint16'")
    p = _copy_prefix(good, tmp_path / "dtype4", manifest=False)
    _poke(p.with_suffix(".idx"), 17, bytes([4]))
    _raises(lambda: IndexedDataset(p), "dtype4.idx", "sequence 1 points at byte")
    # Bytes appended to the .bin; a truncated .bin; another corpus's .idx next to this .bin.
    p = _copy_prefix(good, tmp_path / "appended")
    with open(p.with_suffix(".bin"), "ab") as f:
        f.write(b"\0\0")
    _raises(lambda: IndexedDataset(p), "appended.bin", "longer than its index says")
    other = tmp_path / "other"
    prepare([str(tmp_path / "in.jsonl")], str(other), tokenizer=tokenizer_file, max_documents=20)
    p = _copy_prefix(good, tmp_path / "foreign")
    shutil.copyfile(f"{other}.idx", p.with_suffix(".idx"))
    _raises(lambda: IndexedDataset(p), "foreign.bin", "longer than its index says")
    # The manifest's counts: a stale or edited manifest.
    for key in ("num_documents", "num_tokens"):
        p = _copy_prefix(good, tmp_path / key)
        edited = dict(m, **{key: m[key] + 1})
        p.with_suffix(".json").write_text(json.dumps(edited))
        _raises(lambda p=p: IndexedDataset(p), f"{key}.idx", f"{key}.json says {key} = {m[key] + 1}")
    # Trailing bytes after the index body.
    p = _copy_prefix(good, tmp_path / "longidx")
    with open(p.with_suffix(".idx"), "ab") as f:
        f.write(b"\0" * 8)
    _raises(lambda: IndexedDataset(p), "longidx.idx", "needs")


# ------------------------------------------------------------------ item 8: null and mistyped text


def test_null_text_is_dropped_and_counted_in_every_format(tmp_path: Path, tokenizer_file: str) -> None:  # noqa: F811
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(8, seed=6)
    values = [docs[0], None, docs[1], docs[2], None, docs[3]]  # two nulls among four documents
    kept = [d for d in values if d is not None]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in values))
    (tmp_path / "a.json").write_text(json.dumps([{"text": v} for v in values]))
    pq.write_table(pa.table({"text": pa.array(values, pa.string())}), tmp_path / "a.parquet", row_group_size=4)
    datasets.Dataset.from_dict({"text": values}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.parquet", "saved"):
        prefix = tmp_path / "out" / name.replace(".", "_")
        m = prepare([str(tmp_path / name)], str(prefix), tokenizer=tokenizer_file)
        rep = m["cleaning"]["report"]
        assert rep["removed_documents"]["null_text"] == 2, (name, rep)
        assert rep["input_documents"] == 6 and rep["output_documents"] == 4, (name, rep)
        ds = IndexedDataset(prefix)
        assert [ds[i].tolist() for i in range(len(ds))] == expected_ids(tokenizer_file, kept), name
    # Only nulls: nothing is left, and the error shows the report.
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n' * 3)
    _raises(lambda: prepare([str(tmp_path / "nulls.jsonl")], str(tmp_path / "o" / "n"), tokenizer=tokenizer_file),
            "nulls.jsonl", "zero documents", "null_text")


def test_text_of_the_wrong_type_names_the_file_and_row(tmp_path: Path, tokenizer_file: str) -> None:  # noqa: F811
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "o" / "p")
    run = lambda spec: lambda: prepare([spec], out, tokenizer=tokenizer_file)  # noqa: E731
    pq.write_table(pa.table({"text": [5, 6, 7]}), tmp_path / "ints.parquet")
    _raises(run(str(tmp_path / "ints.parquet")), "ints.parquet: row 0", "'text' is int, not a string")
    pq.write_table(pa.table({"text": pa.array([None, b"abc"], pa.binary())}), tmp_path / "bytes.parquet")
    _raises(run(str(tmp_path / "bytes.parquet")), "bytes.parquet: row 1", "'text' is bytes, not a string")
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "ints_saved"))
    _raises(run(str(tmp_path / "ints_saved")), "ints_saved: row 0", "'text' is int")
    (tmp_path / "mixed.jsonl").write_text('{"text": "fine"}\n{"text": 12}\n')
    _raises(run(str(tmp_path / "mixed.jsonl")), "mixed.jsonl:2", "'text' is int")
    (tmp_path / "list.json").write_text('[{"text": "fine"}, {"text": ["a"]}]')
    _raises(run(str(tmp_path / "list.json")), "list.json[1]", "'text' is list")
    assert os.listdir(tmp_path / "o") == []  # no tokenizer copy, no temporary file


# ------------------------------------------------------------------ item 9: the maximum document size


def test_maximum_document_size_is_applied_before_tokenising(tmp_path: Path, tokenizer_file: str,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from megalite.data import prepare as prep
    from megalite.data.clean import DEFAULT_MAX_CHARS

    assert CleanConfig().max_chars == DEFAULT_MAX_CHARS
    docs = make_docs(20, seed=8)
    long_doc = ("word " * 2000).strip()  # 9999 characters, one line
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10] + [long_doc]
                                               + docs[10:]))
    seen: list[int] = []
    encode = prep._encode_batch
    monkeypatch.setattr(prep, "_encode_batch", lambda texts: (seen.extend(map(len, texts)), encode(texts))[1])
    m = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "p"), tokenizer=tokenizer_file,
                clean=CleanConfig(max_chars=5000), batch_chars=3000)
    assert max(seen) <= 5000, "a document over the maximum reached the tokenizer"
    rep = m["cleaning"]["report"]
    assert rep["removed_documents"]["max_length"] == 1 and rep["removed_chars"]["max_length"] == len(long_doc)
    assert rep["input_documents"] == 21 and rep["output_documents"] == 20
    ds = IndexedDataset(tmp_path / "p")
    assert [ds[i].tolist() for i in range(len(ds))] == expected_ids(tokenizer_file, docs)
    # A batch never holds more than its character budget, unless one document alone is longer.
    assert list(map(len, prep._batches(["a" * 10, "b" * 10, "c" * 25, "d" * 5], 256, 20))) == [2, 1, 1]
    # The CLI's default is the same maximum, and 'none' lifts it.
    import argparse

    from megalite.commands.prepare import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--input", "x", "--output-prefix", "y"]).max_chars == DEFAULT_MAX_CHARS
    assert parser.parse_args(["--input", "x", "--output-prefix", "y", "--max-chars", "none"]).max_chars is None


def _blocks_reference(path: Path) -> list[str]:
    """Blank-line blocks as the reader splits them without a maximum: whole lines, kept line ends."""
    out, block = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            if line.strip(" \t\r\n\f\v"):
                block.append(line)
            elif block:
                out.append("".join(block).rstrip("\r\n"))
                block = []
    return out + (["".join(block).rstrip("\r\n")] if block else [])


def test_readers_count_over_long_documents_without_holding_them(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from megalite.data.sources import Oversized, iter_file

    # Blank-line blocks, read in pieces of max_chars + 2: every block at most max_chars long comes out exactly
    # as without a maximum, every longer one as Oversized or as text the screen then drops (also when a piece
    # boundary falls inside "\r\n", a lone "\r", or a long whitespace line).
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b c", " ", "\n", "\r", "\r\n", "\n\n", "\t", "xyz"])
                       for _ in range(rng.randrange(0, 60)))
        path = tmp_path / "blocks.txt"
        path.write_bytes(text.encode())
        ref = _blocks_reference(path)
        assert list(iter_file(path, "text", True)) == ref, repr(text)
        m = rng.randrange(1, 12)
        got = ["OVER" if isinstance(b, Oversized) or len(b) > m else b for b in iter_file(path, "text", True, m)]
        assert got == ["OVER" if len(b) > m else b for b in ref], (repr(text), m)
    # One document per file: a file of more than 4 x max_chars bytes is counted, not read whole.
    (tmp_path / "big.txt").write_text("é" * 50, encoding="utf-8")  # 100 bytes, 50 characters
    assert list(iter_file(tmp_path / "big.txt", "text", False, 20)) == [Oversized(50)]
    assert list(iter_file(tmp_path / "big.txt", "text", False, 30)) == ["é" * 50]  # 100 <= 4 x 30: read
    # JSON Lines: a line longer than 12 x max_chars + the slack for other fields is counted, not parsed.
    from megalite.data import sources

    line = json.dumps({"text": "z" * 5000})
    (tmp_path / "a.jsonl").write_text('{"text": "short"}\n' + line + '\n{"text": null}\n')
    limit_chars = sources.JSON_MAX_EXPANSION * 100 + sources.JSON_RECORD_SLACK
    assert len(line) <= limit_chars  # under the line limit: parsed (the screen drops it)
    assert list(iter_file(tmp_path / "a.jsonl", "text", False, 100)) == ["short", "z" * 5000, None]
    monkeypatch.setattr(sources, "JSON_RECORD_SLACK", 10)
    assert list(iter_file(tmp_path / "a.jsonl", "text", False, 100)) == ["short", Oversized(len(line) + 1), None]


def test_a_huge_single_line_document_keeps_memory_bounded(tmp_path: Path, tokenizer_file: str) -> None:  # noqa: F811
    """One-line documents of 8M characters (parsed, then dropped: tokenising it would take about 1.5 GB) and 14M
    characters (beyond what a JSON line can hold for a text of the default maximum: counted unread)."""
    from megalite.memory import peak_anon_growth

    docs = make_docs(50, seed=9)
    with open(tmp_path / "in.jsonl", "w") as f:
        for d in docs[:25]:
            f.write(json.dumps({"text": d}) + "\n")
        f.write(json.dumps({"text": "x1 " * 2_700_000}) + "\n")
        f.write(json.dumps({"text": "y2 " * 4_700_000}) + "\n")
        for d in docs[25:]:
            f.write(json.dumps({"text": d}) + "\n")
    growth, m = peak_anon_growth(lambda: prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "p"),
                                                 tokenizer=tokenizer_file))
    assert m["cleaning"]["report"]["removed_documents"]["max_length"] == 2 and m["num_documents"] == 50
    assert growth < 100 * 2**20, f"prepare grew by {growth / 2**20:.0f} MB"


# ------------------------------------------------------------------ item 11: a full disk during prepare


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 160 KiB tmpfs (needs root: the suite's CI runs as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path, small_disk: Path,
                                                         tokenizer_file: str) -> None:  # noqa: F811
    # About 600 KiB of tokens: the .bin fills the disk half-way. 2 workers: the error reaches the parent's writer.
    docs = make_docs(900, seed=10, min_words=40, max_words=80)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for workers in (1, 2):
        msg = _raises(lambda w=workers: prepare([str(tmp_path / "in.jsonl")], str(small_disk / "p"),
                                                tokenizer=tokenizer_file, workers=w),
                      str(small_disk / "p"), "no space left", "MiB free")
        assert sorted(os.listdir(small_disk)) == [], (msg, os.listdir(small_disk))
    # The disk is already full when the tokenizer is copied: the same error, nothing left.
    (small_disk / "filler").write_bytes(b"\0" * (160 * 1024 - 4096))
    _raises(lambda: prepare([str(tmp_path / "in.jsonl")], str(small_disk / "q"), tokenizer=tokenizer_file),
            str(small_disk / "q"), "no space left")
    assert sorted(os.listdir(small_disk)) == ["filler"]
    # ... or when a trained tokenizer is saved.
    _raises(lambda: prepare([str(tmp_path / "in.jsonl")], str(small_disk / "t"), vocab_size=300, max_documents=200),
            str(small_disk / "t"), "no space left")
    assert sorted(os.listdir(small_disk)) == ["filler"]
    # A writer whose index no longer fits: the temporary files go too.
    os.unlink(small_disk / "filler")
    with pytest.raises(OSError):
        with IndexedDatasetWriter(small_disk / "w", np.uint16) as w:
            w.add_documents(np.zeros(70_000, np.uint16), np.full(7_000, 10))
    assert sorted(os.listdir(small_disk)) == []



# ------------------------------------------------------------------ issue 30 item 12: a failed re-prepare


def test_a_failed_re_prepare_keeps_the_previous_dataset(tmp_path: Path, tokenizer_file: str,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing onto an existing prefix and failing part-way (bad input, Ctrl-C while tokenising, a full disk,
    Ctrl-C after the data is written) leaves the previous dataset whole: its files byte for byte, no temporary
    file beside them, and its tokens as the tokenizer itself gives them. A successful run then replaces it."""
    import errno

    from megalite.data import prepare as prep
    from megalite.data.indexed import read_manifest

    docs = make_docs(20, seed=30)
    (tmp_path / "first.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "o"
    prefix = str(out / "p")
    first = prepare([str(tmp_path / "first.jsonl")], prefix, tokenizer=tokenizer_file)
    files = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx", ".json", ".tokenizer.json")}
    listing = sorted(os.listdir(out))
    want = expected_ids(tokenizer_file, docs)

    def still_whole(case: str) -> None:
        assert sorted(os.listdir(out)) == listing, (case, sorted(os.listdir(out)))
        for ext, data in files.items():
            assert Path(prefix + ext).read_bytes() == data, (case, ext)
        assert read_manifest(prefix) == first, case
        ds = IndexedDataset(prefix)
        assert [ds[i].tolist() for i in range(len(ds))] == want, case

    new_docs = make_docs(40, seed=31)
    good = "".join(json.dumps({"text": d}) + "\n" for d in new_docs)
    (tmp_path / "second.jsonl").write_text(good)
    (tmp_path / "bad.jsonl").write_text(good + '{"text": 12}\n')  # fails after 40 documents were written
    again = lambda spec="second.jsonl", **kw: lambda: prepare([str(tmp_path / spec)], prefix, batch_docs=4, **kw)  # noqa: E731
    _raises(again("bad.jsonl", tokenizer=tokenizer_file), "bad.jsonl:41", "'text' is int")
    still_whole("bad input")
    _raises(again("bad.jsonl", vocab_size=300), "bad.jsonl:41")  # a tokenizer trained on the way
    still_whole("bad input, trained tokenizer")

    def failing_on_call(n: int, error: BaseException, fn):  # noqa: ANN001, ANN202
        calls = []

        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(1)
            if len(calls) == n:
                raise error
            return fn(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        m.setattr(prep, "_encode_batch", failing_on_call(3, KeyboardInterrupt(), prep._encode_batch))
        with pytest.raises(KeyboardInterrupt):
            again(tokenizer=tokenizer_file)()
    still_whole("Ctrl-C while tokenising")
    with monkeypatch.context() as m:
        full = OSError(errno.ENOSPC, "No space left on device")
        m.setattr(IndexedDatasetWriter, "add_documents", failing_on_call(3, full, IndexedDatasetWriter.add_documents))
        _raises(again(tokenizer=tokenizer_file), "no space left")
    still_whole("full disk")
    with monkeypatch.context() as m:  # the data is written; the tokenizer's hash for the manifest is not
        m.setattr(prep, "sha256_file", failing_on_call(1, KeyboardInterrupt(), prep.sha256_file))
        with pytest.raises(KeyboardInterrupt):
            again(tokenizer=tokenizer_file)()
    still_whole("Ctrl-C before the manifest")

    second = again(tokenizer=tokenizer_file)()
    assert second["num_documents"] == 40 and read_manifest(prefix) == second
    assert sorted(os.listdir(out)) == listing
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == expected_ids(tokenizer_file, new_docs)


# ------------------------------------------------------------------ item 12: missing prefix, empty eval split


def test_a_missing_prefix_is_named_as_missing(tmp_path: Path) -> None:
    from megalite.data import build_datasets
    from tests.helpers.engine_utils import write_token_dataset

    missing = str(tmp_path / "nodata" / "corpus")
    _raises(lambda: build_datasets([missing], None, "9,1,0", 8, 1), "corpus: data prefix not found",
            "corpus.idx", "corpus.bin", "corpus.json", "nodata does not exist")
    prefix = write_token_dataset(str(tmp_path / "tok"))
    os.unlink(prefix + ".json")
    _raises(lambda: build_datasets([prefix], None, "9,1,0", 8, 1), "tok.json", "does not exist", "eod_token_id")
    os.unlink(prefix + ".idx")
    _raises(lambda: build_datasets([prefix], None, "9,1,0", 8, 1), "tok.idx: file not found")


def test_eval_names_the_split_that_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megalite import config as C
    from megalite import evaluate
    from megalite.model import build_model
    from tests.helpers.engine_utils import tiny_config, write_token_dataset

    prefix = write_token_dataset(str(tmp_path / "tok"), num_docs=40)
    # 949,50,1 of 40 documents: valid gets 2, test 0.04 -> none.
    cfg = C.from_dict(tiny_config(prefix, str(tmp_path / "run"), data={"split": "949,50,1"}))
    model = build_model(cfg.model, seed=1).eval()
    monkeypatch.setattr(evaluate, "model_from_checkpoint", lambda path: (cfg, model, tmp_path / "run"))
    result = evaluate.evaluate_checkpoint("ckpt", split="valid")  # the empty test split is no concern here
    assert result["split"] == "valid" and result["tokens"] > 0
    _raises(lambda: evaluate.evaluate_checkpoint("ckpt", split="test"), "tok", "'949,50,1'", "test set empty",
            "0.10% of the 40 documents")
    cfg.data.split = "1,0,0"
    _raises(lambda: evaluate.evaluate_checkpoint("ckpt", split="valid"), "'1,0,0'", "valid set a share of 0")
