"""Durable file writes and hashing, shared by checkpoints and data preparation.

A reader of anything written here sees the old content or the whole new content, never a part:
files are written under a temporary name, fsynced, renamed into place, and the directory fsynced.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from collections.abc import Sequence
from typing import Any

HASH_CHUNK_BYTES = 8 << 20

# fsync on a directory fails with these where the file system cannot do it (some network and FUSE mounts):
# there is nothing more to make durable. Any other error (EIO above all) means data may be lost: raise it.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR, errno.EACCES}


def sha256_file(path: str | os.PathLike) -> tuple[int, str]:
    """Size and SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside directory `path` durable.

    Only "this file system cannot sync a directory" is ignored; an I/O error is raised.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> str:
    """The name a file is written under before it replaces `path` (this process's own, beside `path`)."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` and fsync it (no rename: see `atomic_write_text` and `replace_together`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically and durably (temporary file, fsync, rename, directory fsync)."""
    path = os.fspath(path)
    tmp = temporary_name(path)
    try:
        write_text_durably(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def replace_together(moves: Sequence[tuple[str, str]]) -> None:
    """Move each already durable (temporary, final) pair into place, in order, then fsync their folders.

    Everything slow or fallible (writing, hashing, a full disk) happens before this, so a failure or an
    interrupt there leaves the previous files untouched. Here only renames remain, and SIGINT/SIGTERM are held
    back until all of them are done (delivered right after): an interrupt cannot split the set. Give the file
    that says the set is complete (a manifest) last. A power cut between two renames can still mix old and new
    files; readers check files against each other and the manifest (counts, sizes) and refuse a mix.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for tmp, final in moves:
            os.replace(tmp, final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(final)) for _, final in moves):
        fsync_dir(folder)


class HashingWriter:
    """A binary file object that hashes the bytes as they are written (so the hash is of what was written)."""

    def __init__(self, path: str | os.PathLike):
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = self._f.write(view)
        self._h.update(view[:n])
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> tuple[int, str]:
        """Flush, fsync and close; returns (size, SHA-256 hex digest)."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        return self.size, self._h.hexdigest()
