"""`megalite prepare`: every input format round-trips through megalite's and Megatron-Core's readers."""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from megalite.commands.prepare import add_arguments, main
from megalite.data.clean import CleanConfig
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from megalite.data.prepare import prepare
from megalite.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "café", "naïve", "日本語", "def", "return", "x", "=", "(", ")", "+", "1"]


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    """n distinct, already-clean documents (cleaning leaves them unchanged)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))))
        docs.append(f"doc {seed}-{i}\n" + "\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny byte-level BPE (vocab 300) shared by the data tests."""
    from megalite.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tok.json"
    train_bpe(iter(make_docs(200, seed=99)), 300).save(str(path))
    return str(path)


def expected_ids(tokenizer_file: str, docs: list[str]) -> list[list[int]]:
    """What prepare must write for already-clean, distinct docs: the tokenizer's ids, then EOD."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    eod = tok.token_to_id("<|endoftext|>")
    return [tok.encode(d, add_special_tokens=False).ids + [eod] for d in docs]


def megatron_reader(prefix: str):
    """Megatron-Core's own IndexedDataset (its import warns about missing Apex/TE on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    return MegatronIndexedDataset(prefix)


def check_round_trip(prefix: str, want: list[list[int]]) -> None:
    """Both readers give exactly `want`, document boundaries included."""
    ours = IndexedDataset(prefix)
    theirs = megatron_reader(prefix)
    assert len(ours) == len(theirs) == len(want)
    assert list(theirs.document_indices) == list(range(len(want) + 1))
    for i, ids in enumerate(want):
        assert ours[i].tolist() == ids
        assert theirs[i].tolist() == ids
    assert ours.num_tokens == sum(map(len, want))


def write_inputs(root: Path, docs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """One input of every kind holding (a part of) docs: name -> (input spec, its documents)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, tuple[str, list[str]]] = {}
    (root / "files").mkdir()
    for i, d in enumerate(docs[:5]):
        (root / "files" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    out["text_file"] = (str(root / "files" / "00.txt"), docs[:1])
    (root / "blocks.txt").write_text("\n\n".join(d.replace("\n", " ") for d in docs[5:10]) + "\n", encoding="utf-8")
    out["text_blocks"] = (str(root / "blocks.txt"), [d.replace("\n", " ") for d in docs[5:10]])
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[10:15]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    out["jsonl"] = (str(root / "a.jsonl"), docs[10:15])
    (root / "a.json").write_text(json.dumps([{"text": d} for d in docs[15:20]]), encoding="utf-8")
    out["json"] = (str(root / "a.json"), docs[15:20])
    pq.write_table(pa.table({"text": docs[20:25], "n": list(range(5))}), root / "a.parquet", row_group_size=2)
    out["parquet"] = (str(root / "a.parquet"), docs[20:25])
    out["directory"] = (str(root / "files"), docs[:5])
    datasets.Dataset.from_dict({"text": docs[25:30]}).save_to_disk(str(root / "saved"))
    out["save_to_disk"] = (str(root / "saved"), docs[25:30])
    (root / "hub").mkdir()
    with open(root / "hub" / "train.jsonl", "w", encoding="utf-8") as f:
        for d in docs[30:35]:
            f.write(json.dumps({"text": d}) + "\n")
    out["datasets_name"] = (f"hf:{root / 'hub'}", docs[30:35])
    return out


def test_every_input_format_round_trips(tmp_path: Path, tokenizer_file: str) -> None:
    docs = make_docs(35)
    inputs = write_inputs(tmp_path, docs)
    for name, (spec, want_docs) in inputs.items():
        prefix = str(tmp_path / "out" / name)
        m = prepare([spec], prefix, tokenizer=tokenizer_file, blank_line_docs=(name == "text_blocks"))
        check_round_trip(prefix, expected_ids(tokenizer_file, want_docs))
        assert m["num_documents"] == len(want_docs), name
        assert m["cleaning"]["report"]["output_documents"] == len(want_docs)
    # All of them at once, in the order given.
    specs = [inputs[k][0] for k in ("jsonl", "parquet", "directory")]
    prefix = str(tmp_path / "out" / "all")
    prepare(specs, prefix, tokenizer=tokenizer_file)
    check_round_trip(prefix, expected_ids(tokenizer_file, docs[10:15] + docs[20:25] + docs[:5]))


def test_stdlib_and_manifest(tmp_path: Path, tokenizer_file: str) -> None:
    from megalite.data.sources import stdlib_files
    from megalite.files import sha256_file

    prefix = str(tmp_path / "std")
    m = prepare(["stdlib"], prefix, tokenizer=tokenizer_file, max_documents=4, clean=CleanConfig(normalize=None))
    files = stdlib_files()
    assert 500 < len(files) < 1500 and not any("/test/" in str(f) for f in files)
    from megalite.data.clean import clean_text

    want = [clean_text(f.read_text(encoding="utf-8"), CleanConfig(normalize=None)) for f in files[:4]]
    check_round_trip(prefix, expected_ids(tokenizer_file, want))
    on_disk = json.loads(Path(prefix + ".json").read_text())
    assert on_disk == m
    for key in ("inputs", "num_documents", "num_tokens", "tokenizer_file", "tokenizer_sha256", "vocab_size",
                "eod_token_id", "bos_token_id", "dtype", "cleaning"):
        assert key in m, key
    assert m["tokenizer_sha256"] == sha256_file(tokenizer_file)[1] == sha256_file(tmp_path / m["tokenizer_file"])[1]
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300 and m["bos_token_id"] is None
    assert m["inputs"] == [{"input": "stdlib", "kind": "stdlib", "documents": 4}]


def test_workers_byte_identical_and_cleaning_report(tmp_path: Path, tokenizer_file: str) -> None:
    docs = make_docs(120, seed=1)
    raw = list(docs)
    raw[3] = docs[3].replace("\n", "  \r\n") + "\x00\x07"  # trailing spaces, CRLF, control characters
    raw += [docs[0], docs[5], "  \n\n ", "tiny", "e\u0301"]  # 2 duplicates, 1 empty, 1 too short, NFC shrinks
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        for d in raw:
            f.write(json.dumps({"text": d}) + "\n")
    cfg = CleanConfig(min_chars=5)
    m1 = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "w1"), tokenizer=tokenizer_file, clean=cfg)
    m4 = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "w4"), tokenizer=tokenizer_file, clean=cfg,
                 workers=4, batch_docs=7)
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w4.bin").read_bytes()
    assert (tmp_path / "w1.idx").read_bytes() == (tmp_path / "w4.idx").read_bytes()
    assert m1["cleaning"] == m4["cleaning"]
    check_round_trip(str(tmp_path / "w4"), expected_ids(tokenizer_file, docs))
    rep = m1["cleaning"]["report"]
    assert rep["input_documents"] == 125 and rep["output_documents"] == 120
    assert rep["removed_documents"]["dedup"] == 2
    assert rep["removed_chars"]["dedup"] == len(docs[0]) + len(docs[5])
    assert rep["removed_documents"]["min_length"] == 3  # the blank one, "tiny", and "é" after NFC
    assert rep["removed_chars"]["control"] == 2 + docs[3].count("\n")  # \x00, \x07 and one \r per line
    assert rep["removed_chars"]["normalize"] == 1
    assert rep["removed_chars"]["whitespace"] >= 2 * docs[3].count("\n") + 5


def test_cli_trains_tokenizer_and_bos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, processors

    docs = make_docs(60, seed=2)
    (tmp_path / "d").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "d" / f"{i:03d}.md").write_text(d, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", str(tmp_path / "d"), "--output-prefix", str(tmp_path / "o" / "p"),
                              "--vocab-size", "320", "--workers", "2", "--no-progress"])
    assert main(args) == 0
    m = json.loads((tmp_path / "o" / "p.json").read_text())
    tok_file = str(tmp_path / "o" / m["tokenizer_file"])
    tok = Tokenizer.from_file(tok_file)
    assert tok.get_vocab_size() == 320 and m["tokenizer_trained"] and m["eod_token_id"] == 0
    check_round_trip(str(tmp_path / "o" / "p"), expected_ids(tok_file, docs))
    # A tokenizer whose post-processor adds a BOS token: each document starts with it.
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(tmp_path / "bos.json"))
    m = prepare([str(tmp_path / "d")], str(tmp_path / "b"), tokenizer=str(tmp_path / "bos.json"))
    assert m["bos_token_id"] == bos and m["vocab_size"] == 321
    check_round_trip(str(tmp_path / "b"), [[bos] + ids for ids in expected_ids(tok_file, docs)])


def test_writer_dtypes_and_reader_checks(tmp_path: Path) -> None:
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    rng = np.random.default_rng(0)
    for vocab in (200, 50_000, 100_000):
        dtype = token_dtype(vocab)
        docs = [rng.integers(0, vocab, size=int(n)) for n in rng.integers(1, 50, size=20)]
        with IndexedDatasetWriter(tmp_path / f"v{vocab}", dtype) as w:
            for d in docs[:5]:
                w.add_document(d)
            w.add_documents(np.concatenate(docs[5:]), np.array([len(d) for d in docs[5:]]))
        check_round_trip(str(tmp_path / f"v{vocab}"), [d.tolist() for d in docs])
    # A failed write leaves nothing behind that looks like a dataset.
    with pytest.raises(DataError):
        with IndexedDatasetWriter(tmp_path / "bad", np.uint16) as w:
            w.add_documents(np.arange(3), np.array([5]))
    assert not list(tmp_path.glob("bad*"))


class _ReadCounter:
    """A text file stand-in that records how many characters have been read."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def read(self, n: int = -1) -> str:
        out = self.text[self.at :] if n < 0 else self.text[self.at : self.at + n]
        self.at += len(out)
        return out


def test_json_array_streams_records(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A top-level JSON array is decoded element by element from a small buffer: every element (with escapes,
    non-ASCII, nesting, numbers cut at a buffer edge, odd spacing) as json.loads sees it, the first before the
    file is read through, and malformed arrays as DataErrors naming the file and element."""
    from megalite.data import sources

    rng = random.Random(7)
    records = [{"text": "".join(rng.choice('ab \\"\n\tü€😀{}[],:') for _ in range(rng.randrange(0, 60))),
                "meta": {"n": rng.randrange(10**9), "x": [1.5e-3, None, True]}} for _ in range(40)]
    records += [123456789, "a bare string", [], {}, -0.25]
    text = "\ufeff" + " \n[\n" + " ,\t".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records) + "\n] \n"
    for chunk in (1, 3, 7, 64, 1 << 20):
        monkeypatch.setattr(sources, "JSON_CHUNK_CHARS", chunk)
        f = _ReadCounter(text.lstrip("\ufeff"))
        items = sources.json_array_items(f, "x.json")
        assert next(items) == records[0]
        if chunk < 100:
            assert f.at < len(f.text) // 4, "the first record must come before the file is read through"
        assert [records[0], *items] == records, f"chunk {chunk}"
    # Through the prepare reader (a file with a byte-order mark): the documents, then the first bad record named.
    monkeypatch.setattr(sources, "JSON_CHUNK_CHARS", 5)
    path = tmp_path / "docs.json"
    path.write_text(text, encoding="utf-8")
    docs = sources.iter_file(path, "text", False)
    assert [next(docs) for _ in range(40)] == [r["text"] for r in records[:40]]
    with pytest.raises(DataError, match=r"docs\.json\[40\]: expected an object with key 'text', got int"):
        next(docs)
    for bad, fragment in (('[{"text": "a"}, {"text": "b"', r"bad\.json\[1\]: invalid JSON"),
                          ('[{"text": "a"} {"text": "b"}]', r"expected ',' or '\]' after element 0, got '\{'"),
                          ('[{"text": "a"},]', r"expected an element after ',' following element 0"),
                          ('[{"text": "a"}] x', r"unexpected text after the JSON array"),
                          ('[{"text": "a"}, {"text": bad}]', r"bad\.json\[1\]: invalid JSON \(Expecting value\)"),
                          ('[{"text": "a"}', r"expected ',' or '\]' after element 0, got the end of the file")):
        (tmp_path / "bad.json").write_text(bad, encoding="utf-8")
        with pytest.raises(DataError, match=fragment):
            list(sources.iter_file(tmp_path / "bad.json", "text", False))
