"""Megatron-LM's indexed dataset format (`PREFIX.idx` + `PREFIX.bin`): a streaming writer and a mmap reader.

Layout of `.idx` (little endian), as Megatron-Core's `IndexedDataset` reads it:
    b"MMIDIDX\\x00\\x00"  magic (9 bytes)
    u64 version = 1
    u8  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64 sequence count S
    u64 document count D (= number of documents + 1: document_indices starts with 0)
    i32[S] sequence lengths (tokens), i64[S] sequence byte offsets into `.bin`, i64[D] document indices
`.bin` holds the tokens of every sequence back to back. megalite writes one sequence per document,
so document_indices is simply 0..S.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from megalite.errors import DataError
from megalite.files import replace_together, temporary_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}

# Copying the temporary lengths file into the index in chunks keeps the writer's memory constant.
_CHUNK = 1 << 20
# Entries checked per step when an index is opened: about 40 MB of temporaries whatever the index size.
_CHECK_CHUNK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned/int dtype Megatron can read that holds every id below `vocab_size`."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def idx_path(prefix: str | os.PathLike) -> str:
    """The `.idx` file of a prefix."""
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    """The `.bin` file of a prefix."""
    return f"{os.fspath(prefix)}.bin"


def manifest_path(prefix: str | os.PathLike) -> str:
    """The manifest (`PREFIX.json`) of a prefix."""
    return f"{os.fspath(prefix)}.json"


def read_manifest(prefix: str | os.PathLike) -> dict | None:
    """The manifest of a prefix, or None when there is none (data prepared by another tool)."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    return manifest


class IndexedDatasetWriter:
    """Streams documents into `PREFIX.bin`/`PREFIX.idx`; memory stays constant whatever the corpus size.

    Files are written under temporary names and renamed by `finalize()`, so a crash or an error never
    leaves a half-written dataset that looks complete. Use as a context manager: leaving the block with
    an exception removes the temporary files. `finalize(publish=False)` stops before the renames and returns
    them, for a caller that moves these files into place together with others (`megalite prepare`).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"{self.prefix}: token dtype {self.dtype} has no Megatron dtype code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = temporary_name(bin_path(self.prefix))
        self._idx_tmp = temporary_name(idx_path(self.prefix))
        self._bin = open(self._bin_tmp, "wb")
        # Sequence lengths go to a side file (4 bytes per document) instead of a Python list, because the
        # index needs the counts in its header before the lengths: memory is then independent of the corpus.
        try:
            fd, self._len_tmp = tempfile.mkstemp(prefix=Path(self.prefix).name + ".", suffix=".lengths",
                                                 dir=Path(self.prefix).parent)
        except BaseException:
            self._bin.close()
            os.unlink(self._bin_tmp)
            raise
        self._lengths = os.fdopen(fd, "wb")
        self.num_documents = 0
        self.num_tokens = 0
        self._closed = False

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids)."""
        self.add_documents(np.asarray(tokens), np.array([len(tokens)], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents given as their concatenated tokens and their lengths."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise DataError(f"{self.prefix}: lengths sum to {int(lengths.sum())} but {tokens.size} tokens given")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a document of {int(lengths.max())} tokens exceeds the int32 length field")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_documents += int(lengths.size)
        self.num_tokens += int(tokens.size)

    def finalize(self, publish: bool = True) -> list[tuple[str, str]]:
        """Write the index, make both files durable and move them into place (`.bin` first, `.idx` last).
        On any error (a full disk above all) the temporary files are removed before the error propagates.

        publish=False: leave both files durable under their temporary names and return the (temporary, final)
        renames still to make, `.bin` first; `abort()` still removes them until the caller has made them."""
        try:
            moves = self._write_index()
            if publish:
                replace_together(moves)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return moves

    def _write_index(self) -> list[tuple[str, str]]:
        _close_durably(self._bin)
        self._lengths.close()
        n = self.num_documents
        itemsize = self.dtype.itemsize
        with open(self._idx_tmp, "wb") as out, open(self._len_tmp, "rb") as lens:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", n + 1))
            while chunk := lens.read(_CHUNK * 4):
                out.write(chunk)
            lens.seek(0)
            offset = 0
            while chunk := lens.read(_CHUNK * 4):
                lengths = np.frombuffer(chunk, dtype=np.int32).astype(np.int64)
                ends = np.cumsum(lengths) * itemsize + offset
                starts = ends - lengths * itemsize
                out.write(starts.astype(np.int64).tobytes())
                offset = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):
                out.write(np.arange(start, min(n + 1, start + _CHUNK), dtype=np.int64).tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.unlink(self._len_tmp)
        return [(self._bin_tmp, bin_path(self.prefix)), (self._idx_tmp, idx_path(self.prefix))]

    def abort(self) -> None:
        """Close and remove the temporary files. Never raises: closing flushes buffered bytes, which fails
        again on a full disk, and the files must go all the same."""
        for f in (self._bin, self._lengths):
            try:
                f.close()
            except OSError:
                pass
        for p in (self._bin_tmp, self._len_tmp, self._idx_tmp):
            try:
                os.unlink(p)
            except OSError:  # already gone (or renamed into place by finalize)
                pass
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def check_index(
    prefix: str,
    dtype: np.dtype,
    lengths: np.ndarray,
    pointers: np.ndarray,
    document_indices: np.ndarray,
    bin_size: int,
) -> None:
    """Check an index body against itself, its `.bin` size and the prefix's manifest; DataError naming the
    file and the first bad entry.

    Every length is positive; each pointer is the sum of the lengths before it times the dtype's size; the
    last pointer plus its length is exactly the `.bin` size; document indices start at 0, increase and end
    at the sequence count; the manifest's dtype, document and token counts (when it has them) match. Numpy
    over chunks of `_CHECK_CHUNK` entries: linear in the number of sequences, constant memory.
    """
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    itemsize = dtype.itemsize
    redo = "the index is damaged or belongs to other data: re-run `megalite prepare`"
    s = lengths.size
    offset = 0  # byte offset in .bin where the next sequence must start
    for lo in range(0, s, _CHECK_CHUNK):
        chunk = lengths[lo : lo + _CHECK_CHUNK].astype(np.int64)
        bad = np.flatnonzero(chunk <= 0)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{ipath}: sequence {lo + i} has length {int(chunk[i])} (must be positive); {redo}")
        ends = np.cumsum(chunk) * itemsize + offset
        starts = ends - chunk * itemsize
        bad = np.flatnonzero(pointers[lo : lo + _CHECK_CHUNK] != starts)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{ipath}: sequence {lo + i} points at byte {int(pointers[lo + i])} of {os.path.basename(bpath)}, "
                f"but the lengths before it ({dtype.name}, {itemsize} bytes a token) put it at byte "
                f"{int(starts[i])}; {redo}"
            )
        offset = int(ends[-1])
    if bin_size != offset:
        which = "shorter" if bin_size < offset else "longer"
        raise DataError(
            f"{bpath}: data file is {which} than its index says ({bin_size} bytes, index needs exactly {offset}); "
            "it is truncated, has bytes appended or belongs to another index: re-run `megalite prepare`"
        )
    d = document_indices
    if int(d[0]) != 0:
        raise DataError(f"{ipath}: document index 0 is {int(d[0])} (must be 0); {redo}")
    for lo in range(0, d.size - 1, _CHECK_CHUNK):
        step = np.diff(d[lo : lo + _CHECK_CHUNK + 1])
        bad = np.flatnonzero(step <= 0)
        if bad.size:
            i = lo + int(bad[0]) + 1
            raise DataError(
                f"{ipath}: document index {i} is {int(d[i])}, not above the one before it ({int(d[i - 1])}); {redo}"
            )
    if int(d[-1]) != s:
        raise DataError(f"{ipath}: last document index {int(d[-1])} != sequence count {s}; {redo}")
    manifest = read_manifest(prefix)
    if manifest is None:
        return
    mpath = manifest_path(prefix)
    if "dtype" in manifest and manifest["dtype"] != dtype.name:
        raise DataError(
            f"{ipath}: token dtype {dtype.name} (code {CODE_OF_DTYPE[dtype]} in the header) but {mpath} says "
            f"{manifest['dtype']!r}; {redo}"
        )
    tokens = offset // itemsize
    for key, have in (("num_documents", s), ("num_tokens", tokens)):
        if key in manifest and manifest[key] != have:
            raise DataError(f"{ipath}: {have} {key[4:]} in the index but {mpath} says {key} = {manifest[key]}; {redo}")


def _close_durably(f) -> None:  # noqa: ANN001 - a binary file object
    f.flush()
    os.fsync(f.fileno())
    f.close()


class IndexedDataset:
    """A memory-mapped reader of a Megatron indexed dataset: `ds[i]` is document/sequence i's token array.

    Opening checks the whole index against itself, the `.bin` and the manifest (`check_index`), so a damaged,
    mismatched or foreign file fails here with its name and the first bad entry, not later in training.
    `verify=False` skips the body checks (the header is always checked): a DataLoader worker re-opening a
    dataset its parent already checked uses it.
    """

    def __init__(self, prefix: str | os.PathLike, verify: bool = True):
        self.prefix = os.fspath(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise DataError(f"{p}: file not found (expected a dataset written by `megalite prepare`)")
        size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:9] != MAGIC:
            raise DataError(f"{ipath}: not a Megatron indexed dataset index (magic {header[:9]!r}, expected {MAGIC!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{ipath}: index version {version} is not supported (expected {VERSION})")
        code = header[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack("<QQ", header[18:34])
        s, d = self.sequence_count, self.document_count
        expected = HEADER_SIZE + 4 * s + 8 * s + 8 * d
        if size != expected:
            raise DataError(
                f"{ipath}: index is {size} bytes but its header ({s} sequences, {d} document boundaries) needs "
                f"{expected}: it is {'truncated' if size < expected else 'damaged'}; re-run `megalite prepare`"
            )
        if d < 1:
            raise DataError(f"{ipath}: index has no document boundaries")
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=s, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=s, offset=HEADER_SIZE + 4 * s)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * s)
        have = os.path.getsize(bpath)
        if verify:
            check_index(self.prefix, self.dtype, self.sequence_lengths, self.sequence_pointers,
                        self.document_indices, have)
        # An empty memmap is an error in numpy, and a zero-document dataset is legal to open.
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype) if have else np.zeros(0, dtype=self.dtype)

    def __getstate__(self) -> dict:
        # Pickle the prefix, not the mapped arrays: a DataLoader worker re-maps the files instead of copying them.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], verify=False)  # checked when the original was opened

    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += self.sequence_count
        if not 0 <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.sequence_count} sequences in {self.prefix}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence i, without reading the rest."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self._bin[start : start + n]

    @property
    def num_tokens(self) -> int:
        """Total tokens in `.bin`."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def tokens(self) -> np.ndarray:
        """Every token as one flat memory-mapped array (sequences are back to back)."""
        return self._bin
