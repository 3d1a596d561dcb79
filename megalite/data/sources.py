"""Streaming document readers for every input `megalite prepare` accepts.

An input is a plain text file (one document per file, or per blank-line-separated block), a JSON Lines,
JSON or Parquet file, a directory of them (walked in sorted order), a `datasets` dataset saved with
`save_to_disk`, a dataset name `datasets` can load (offline cache; `hf:NAME[:SPLIT]` forces this), or
`stdlib`: the running interpreter's standard library sources. Every reader yields one document at a
time in a deterministic order. A JSON file whose top level is an array is streamed record by record; one
whose top level is an object (`{"data": [...]}`) is read whole.

Null text is one rule for every format: a record whose text is null (JSON `null`, a Parquet or `datasets`
null) is yielded as None, and `prepare` drops it and counts it under `null_text` in the cleaning report. Text
of another type (a number, bytes, a list) is a DataError naming the file and the record: its line in JSON
Lines, its index in a JSON array, its row (from 0) in Parquet and `datasets`. A missing key or column is a
DataError too (a wrong `--text-key`, not a gap in the data).

With a maximum document size (`max_chars`), the line-based readers never hold a document known to be longer:
a one-document text file of more than 4 x max_chars bytes (UTF-8 needs at most 4 bytes a character), a
blank-line block of more than max_chars characters and a JSON Lines line of more than
`JSON_MAX_EXPANSION x max_chars + JSON_RECORD_SLACK` characters are read in pieces, counted and yielded as
`Oversized(chars)`, which `prepare` drops and counts. JSON arrays, Parquet and `datasets` hold one record (one
Arrow batch) whole before the maximum applies.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, Union

from megalite.errors import DataError, shown

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
# JSON needs at most 12 characters for one character of text (an astral character as a \\uXXXX\\uXXXX pair), so
# a JSON Lines line longer than 12 x max_chars plus room for the other fields cannot hold a short enough text.
JSON_MAX_EXPANSION = 12
JSON_RECORD_SLACK = 1 << 16
_READ_PIECE = 1 << 20  # characters read at a time when a document is only counted


@dataclass(frozen=True)
class Oversized:
    """A document longer than the maximum, counted by its reader without holding its text."""

    chars: int  # its length (for a JSON Lines line: the line's length)


Document = Union[str, None, Oversized]  # text, null text, or an over-long document skipped unread

# Folders of the standard library that are tests or third-party packages, not the library itself.
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class Source:
    """One resolved input: what the user wrote and how it will be read."""

    spec: str
    kind: str  # stdlib, text, jsonl, json, parquet, directory, saved_dataset, hub_dataset
    path: str | None = None
    split: str | None = None


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files without test folders, in sorted order."""
    out: list[Path] = []
    for d, dirs, files in os.walk(stdlib_root()):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP)
        out.extend(Path(d) / f for f in sorted(files) if f.endswith(".py"))
    return out


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _looks_like_dataset_name(spec: str) -> bool:
    # "org/name" or "name": no file extension, not an explicit path.
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?", spec)) and not Path(spec).suffix


def resolve(spec: str) -> Source:
    """Turn one `--input` value into a Source; DataError naming it when it does not exist."""
    if spec == "stdlib":
        return Source(spec, "stdlib", str(stdlib_root()))
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return Source(spec, "hub_dataset", name, split or None)
    path = Path(spec)
    if path.is_dir():
        return Source(spec, "saved_dataset" if _is_saved_dataset(path) else "directory", str(path))
    if path.is_file():
        return Source(spec, file_kind(path), str(path))
    if path.exists():
        raise DataError(f"{spec}: input is neither a file nor a directory")
    if _looks_like_dataset_name(spec):
        name, _, split = spec.partition(":")
        return Source(spec, "hub_dataset", name, split or None)
    raise DataError(f"{spec}: input not found (no such file or directory)")


def file_kind(path: Path) -> str:
    """How a file is read, from its suffix; anything unknown is plain text."""
    s = path.suffix.lower()
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in JSON_SUFFIXES:
        return "json"
    if s in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def iter_source(
    src: Source, text_key: str = "text", blank_line_docs: bool = False, max_chars: int | None = None
) -> Iterator[Document]:
    """Yield the documents of one input, in a deterministic order: the text, None for a record whose text is
    null, or Oversized for a document the reader knows to be longer than `max_chars` without holding it."""
    if src.kind == "stdlib":
        for f in stdlib_files():
            yield from _read_text(f, False, max_chars)
    elif src.kind == "directory":
        files = sorted(
            p for p in Path(src.path).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src.path).parts)
        )
        for f in files:
            yield from iter_file(f, text_key, blank_line_docs, max_chars)
    elif src.kind == "saved_dataset":
        yield from _iter_saved(src, text_key)
    elif src.kind == "hub_dataset":
        yield from _iter_hub(src, text_key)
    else:
        yield from iter_file(Path(src.path), text_key, blank_line_docs, max_chars)


def iter_file(path: Path, text_key: str, blank_line_docs: bool, max_chars: int | None = None) -> Iterator[Document]:
    """Yield the documents of one file."""
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, text_key, max_chars)
    elif kind == "json":
        yield from _read_json(path, text_key)
    elif kind == "parquet":
        yield from _read_parquet(path, text_key)
    else:
        yield from _read_text(path, blank_line_docs, max_chars)


_SPACE = " \t\r\n\f\v"


def _read_text(path: Path, blank_line_docs: bool, max_chars: int | None = None) -> Iterator[str | Oversized]:
    try:
        if blank_line_docs:
            yield from _read_blocks(path, max_chars)
        elif max_chars is not None and path.stat().st_size > 4 * max_chars:
            # More than max_chars characters for certain: counted piece by piece, never held.
            with open(path, encoding="utf-8") as f:
                yield Oversized(sum(len(piece) for piece in iter(lambda: f.read(_READ_PIECE), "")))
        else:
            text = path.read_text(encoding="utf-8")
            if text:
                yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _pieces(f: TextIO, limit: int) -> Iterator[str]:
    """`f.readline(limit)` until the end of the file, except that a "\\r\\n" is never split in two pieces (a
    "\\r" that the limit cut off from what follows is completed by looking at the next character)."""
    carry = ""
    while True:
        carried = bool(carry)
        piece, carry = (carry, "") if carried else (f.readline(limit), "")
        if not piece:
            return
        if piece.endswith("\r") and (carried or len(piece) == limit):
            c = f.read(1)
            if c == "\n":
                piece += c
            else:
                carry = c
        yield piece


def _read_blocks(path: Path, max_chars: int | None) -> Iterator[str | Oversized]:
    """Blank-line separated blocks, read in pieces of at most max_chars + 2 characters: a block is held only
    while it can still be short enough (the 2 are the line end that is stripped)."""
    limit = -1 if max_chars is None else max_chars + 2
    block: list[str] = []
    block_size = 0
    line: list[str] = []
    line_size = 0
    line_has_text = False

    def end_block() -> Iterator[str | Oversized]:
        nonlocal block, block_size
        if block_size:
            if limit >= 0 and block_size > limit:
                yield Oversized(block_size)
            else:
                yield "".join(block).rstrip("\r\n")
        block, block_size = [], 0

    def end_line() -> Iterator[str | Oversized]:
        nonlocal block, block_size, line, line_size, line_has_text
        if line_has_text:
            block_size += line_size
            if limit < 0 or block_size <= limit:
                block.extend(line)
            else:
                block = []
        else:
            yield from end_block()
        line, line_size, line_has_text = [], 0, False

    with open(path, encoding="utf-8", newline="") as f:
        for piece in _pieces(f, limit):
            line_size += len(piece)
            line_has_text = line_has_text or bool(piece.strip(_SPACE))
            if limit < 0 or line_size <= limit:
                line.append(piece)
            if piece.endswith(("\n", "\r")):  # else the limit cut the line: it goes on
                yield from end_line()
        if line_size:  # the last line, without a line end
            yield from end_line()
        yield from end_block()


def _check_text(value: object, text_key: str, where: str) -> str | None:
    """`value` if it is text, None if it is null; DataError naming `where` for any other type."""
    if value is None or isinstance(value, str):
        return value
    hint = " (decode the column to UTF-8 strings first)" if isinstance(value, (bytes, bytearray)) else ""
    raise DataError(f"{where}: {shown(text_key)} is {type(value).__name__}, not a string{hint}")


def _text_of(record: object, text_key: str, where: str) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with key {shown(text_key)}, got {type(record).__name__}")
    if text_key not in record:
        keys = shown(", ".join(map(str, record)), quote=False)
        raise DataError(f"{where}: no key {shown(text_key)} (keys: {keys}); use --text-key")
    return _check_text(record[text_key], text_key, where)


def _read_jsonl(path: Path, text_key: str, max_chars: int | None = None) -> Iterator[str | None | Oversized]:
    limit = -1 if max_chars is None else JSON_MAX_EXPANSION * max_chars + JSON_RECORD_SLACK
    with open(path, encoding="utf-8") as f:
        lineno = 0
        while line := f.readline(limit):
            lineno += 1
            if limit >= 0 and len(line) == limit and not line.endswith("\n"):
                # Too long to hold a text of max_chars characters: the rest of the line is counted, not held.
                size = len(line)
                del line
                while (piece := f.readline(_READ_PIECE)) and not piece.endswith("\n"):
                    size += len(piece)
                size += len(piece)
                yield Oversized(size)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            yield _text_of(record, text_key, f"{path}:{lineno}")


def _read_json(path: Path, text_key: str) -> Iterator[str | None]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.read(4096).lstrip()
            f.seek(0)
            if first.startswith("["):  # a top-level array: streamed, one record in memory at a time
                for i, record in enumerate(json_array_items(f, str(path))):
                    yield _text_of(record, text_key, f"{path}[{i}]")
                return
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict) and text_key not in data:
        # {"data": [...]} style files: take the single list inside.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records or an object with key {shown(text_key)}")
        data = lists[0]
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield _text_of(record, text_key, f"{path}[{i}]")


JSON_CHUNK_CHARS = 1 << 20
_JSON_SPACE = " \t\r\n"


def json_array_items(f: TextIO, where: str) -> Iterator[object]:
    """The elements of the JSON array in text file `f`, decoded one at a time from a bounded buffer.

    The buffer holds about JSON_CHUNK_CHARS characters plus the element being decoded; an element that
    does not fit is retried with twice as much text each time, so a huge element costs linear time.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill(size: int) -> None:
        nonlocal buf, pos, eof
        data = f.read(size)
        eof = not data
        buf, pos = buf[pos:] + data, 0

    def peek() -> str:
        """The next non-space character ("" at the end of the file), with `pos` on it."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _JSON_SPACE:
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            fill(JSON_CHUNK_CHARS)

    if peek() != "[":
        raise DataError(f"{where}: expected a JSON array")
    pos += 1
    index = 0
    if peek() == "]":
        pos += 1
    else:
        while True:
            want = JSON_CHUNK_CHARS
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the buffer's end may continue in the file
                        break
                except json.JSONDecodeError as e:
                    # An element cut off by the buffer's end fails at that end (or in an unterminated string);
                    # an error well before it is in the data itself.
                    cut = e.pos >= len(buf) - 6 or e.msg.startswith("Unterminated string")
                    if eof or not cut:
                        raise DataError(f"{where}[{index}]: invalid JSON ({e.msg})") from None
                fill(want)
                want *= 2
            pos = end
            yield item
            index += 1
            c = peek()
            if c == "]":
                pos += 1
                break
            if c != ",":
                got = repr(c) if c else "the end of the file"
                raise DataError(f"{where}: expected ',' or ']' after element {index - 1}, got {got}")
            pos += 1
            if peek() in ("]", ""):
                raise DataError(f"{where}: expected an element after ',' following element {index - 1}")
    if peek():
        raise DataError(f"{where}: unexpected text after the JSON array's closing ']'")


def _read_parquet(path: Path, text_key: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    if text_key not in pf.schema_arrow.names:
        columns = shown(", ".join(pf.schema_arrow.names), quote=False)
        raise DataError(f"{path}: no column {shown(text_key)} (columns: {columns}); use --text-key")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, text_key, f"{path}: row {row}")
            row += 1


def _iter_dataset(ds: object, text_key: str, where: str) -> Iterator[str | None]:
    names = getattr(ds, "column_names", None) or []
    if text_key not in names:
        raise DataError(f"{where}: no column {shown(text_key)} (columns: {shown(', '.join(names), quote=False)}); "
                        "use --text-key")
    # Batches of a memory-mapped Arrow table: only one batch is materialised at a time.
    row = 0
    for batch in ds.select_columns([text_key]).iter(batch_size=1024):
        for value in batch[text_key]:
            yield _check_text(value, text_key, f"{where}: row {row}")
            row += 1


def _pick_split(dd: object, split: str | None, where: str) -> object:
    splits = list(dd.keys())
    if split is None:
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(f"{where}: several splits ({', '.join(splits)}); pick one with NAME:SPLIT")
    if split not in splits:
        raise DataError(f"{where}: no split {shown(split)} (splits: {', '.join(splits)})")
    return dd[split]


def _iter_saved(src: Source, text_key: str) -> Iterator[str | None]:
    import datasets

    try:
        ds = datasets.load_from_disk(src.path)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file name
        raise DataError(f"{src.path}: cannot load the saved dataset ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, src.split, src.spec)
    yield from _iter_dataset(ds, text_key, src.spec)


def _iter_hub(src: Source, text_key: str) -> Iterator[str | None]:
    import datasets

    try:
        ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{src.spec}: input is not a file or directory, and `datasets` cannot load it as a dataset "
            f"(offline: only names already in the cache work): {type(e).__name__}: {e}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, None, src.spec)
    yield from _iter_dataset(ds, text_key, src.spec)
