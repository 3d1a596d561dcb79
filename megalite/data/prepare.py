"""`megalite prepare`: text -> cleaned, de-duplicated documents -> tokens -> `PREFIX.bin`/`.idx`/`.json`.

The pipeline streams: the parent process reads documents one at a time and hands batches to worker
processes, which clean, hash and tokenise them; the parent takes the results back in submission order
(so the output is the same for any number of workers), drops exact duplicates by their 16-byte digest
and appends the rest to the indexed dataset. At most `2 x workers` batches are in flight, so memory is
bounded by the batch size and the de-duplication set, never by the corpus.

Heavy libraries (tokenizers, datasets, pyarrow) are imported inside functions so `megalite --help` is fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.clean import CleanConfig, CleanReport, Deduplicator, clean_and_filter, digest, screen
from megalite.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    idx_path,
    manifest_path,
    read_manifest,
    token_dtype,
)
from megalite.data.sources import Document, Source, iter_source, resolve
from megalite.data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info, train_bpe
from megalite.errors import DataError
from megalite.files import replace_together, sha256_file, temporary_name, write_text_durably

MANIFEST_FORMAT = "megalite-indexed/1"
DEFAULT_VOCAB_SIZE = 8192


def tokenizer_path(prefix: str | os.PathLike) -> str:
    """Where prepare saves the tokenizer of a prefix."""
    return f"{os.fspath(prefix)}.tokenizer.json"


# ---------------------------------------------------------------- reading


def iter_documents(
    sources: list[Source],
    text_key: str,
    blank_line_docs: bool,
    max_documents: int | None,
    counts: dict[str, int] | None = None,
    max_chars: int | None = None,
) -> Iterator[Document]:
    """Every document of every source in order (see `sources.iter_source`); DataError for a source with none."""
    total = 0
    for src in sources:
        n = 0
        for doc in iter_source(src, text_key, blank_line_docs, max_chars):
            if max_documents is not None and total >= max_documents:
                break
            n += 1
            total += 1
            yield doc
        if counts is not None:
            counts[src.spec] = n
        if n == 0 and (max_documents is None or total < max_documents):
            raise DataError(f"{src.spec}: input is empty (no documents found in it)")
        if max_documents is not None and total >= max_documents:
            return


def _batches(docs: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Batches of at most `max_docs` documents and `max_chars` characters (or one longer document alone):
    a worker's memory follows the larger of a batch and the longest document, never their sum."""
    batch: list[str] = []
    chars = 0
    for d in docs:
        if batch and chars + len(d) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tok_file: str, info: TokenizerInfo, cfg: CleanConfig, dtype: str) -> None:
    # One tokenizer thread per process: --workers is then the real degree of parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=load_tokenizer(tok_file), info=info, cfg=cfg, dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, CleanReport]:
    """Clean, hash and tokenise one batch: (digests, char counts, token counts, tokens, report)."""
    tok, info, cfg = _WORKER["tok"], _WORKER["info"], _WORKER["cfg"]
    report = CleanReport()
    kept: list[str] = []
    for t in texts:
        c = clean_and_filter(t, cfg, report)
        if c is not None:
            kept.append(c)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(kept, add_special_tokens=False) if kept else []
    flat: list[int] = []
    lengths = np.empty(len(kept), dtype=np.int64)
    bos, eod = info.bos_token_id, info.eod_token_id
    for i, enc in enumerate(encodings):
        ids = enc.ids
        if bos is not None:
            flat.append(bos)
        flat.extend(ids)
        flat.append(eod)
        lengths[i] = len(ids) + 1 + (bos is not None)
    digests = b"".join(digest(c) for c in kept)
    chars = np.fromiter((len(c) for c in kept), dtype=np.int64, count=len(kept))
    tokens = np.array(flat, dtype=_WORKER["dtype"])
    del encodings, flat, kept
    _release_memory()
    return digests, chars, lengths, tokens, report


def _release_memory() -> None:
    # glibc keeps freed heap pages; a batch with one huge document would otherwise pin its peak for the
    # rest of the run in every worker. Returning them keeps the sum over workers near one batch each.
    trim = _WORKER.get("malloc_trim")
    if trim is None:
        try:
            import ctypes

            trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            trim = False
        _WORKER["malloc_trim"] = trim
    if trim:
        trim(0)


# ---------------------------------------------------------------- the pipeline


def prepare(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_key: str = "text",
    workers: int = 1,
    blank_line_docs: bool = False,
    clean: CleanConfig | None = None,
    eod_token: str | None = None,
    max_documents: int | None = None,
    batch_docs: int = 256,
    batch_chars: int = 1 << 18,
    progress: bool | None = None,
) -> dict:
    """Run the whole pipeline; return the manifest (also written to PREFIX.json). DataError on bad input.

    Every output (tokenizer, `.bin`, `.idx`, manifest) is written under a temporary name and the four are moved
    into place together at the very end, manifest last. A failure before then (bad input, a full disk, an
    interrupt) removes the temporary files and leaves the prefix as it was: a dataset prepared there earlier
    stays whole and usable. A full disk is a DataError naming the output and the free space.
    """
    cfg = clean or CleanConfig()
    if workers < 1:
        raise DataError(f"--workers {workers}: need at least 1")
    if not inputs:
        raise DataError("no --input given")
    if tokenizer is not None and vocab_size is not None:
        raise DataError("give either --tokenizer or --vocab-size, not both")
    if cfg.min_chars < 0:
        raise DataError(f"--min-chars {cfg.min_chars}: must be 0 or more")
    if cfg.max_chars is not None and cfg.max_chars < max(1, cfg.min_chars):
        raise DataError(f"--max-chars {cfg.max_chars}: must be at least 1 and at least --min-chars {cfg.min_chars}")
    if progress is None:
        progress = sys.stderr.isatty()
    sources = [resolve(s) for s in inputs]  # missing inputs fail here, before any slow work
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, str]] = []  # (temporary, final) outputs, moved into place together at the end
    try:
        return _prepare(sources, output_prefix, tokenizer, vocab_size, text_key, workers, blank_line_docs, cfg,
                        eod_token, max_documents, batch_docs, batch_chars, progress, staged)
    except BaseException as e:
        for tmp, _ in staged:  # gone already where they were moved into place
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(output_prefix))
            free = shutil.disk_usage(folder).free
            raise DataError(
                f"{output_prefix}.bin/.idx/.json/.tokenizer.json: no space left on the device of {folder} while "
                f"writing the prepared data; this run's partial files were removed (a dataset prepared there before is "
                f"unchanged), which leaves {free / 2**20:.1f} MiB free there. Free some space or choose another "
                f"--output-prefix."
            ) from e
        raise


def _prepare(
    sources: list[Source],
    output_prefix: str,
    tokenizer: str | None,
    vocab_size: int | None,
    text_key: str,
    workers: int,
    blank_line_docs: bool,
    cfg: CleanConfig,
    eod_token: str | None,
    max_documents: int | None,
    batch_docs: int,
    batch_chars: int,
    progress: bool,
    staged: list[tuple[str, str]],
) -> dict:
    t0 = time.perf_counter()
    inputs = [s.spec for s in sources]
    tok_out = tokenizer_path(output_prefix)
    tok_tmp = temporary_name(tok_out)

    # Tokenizer: copied byte for byte (its hash then matches the user's file) or trained on a stream.
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if os.path.abspath(tokenizer) != os.path.abspath(tok_out):
            staged.append((tok_tmp, tok_out))
            shutil.copyfile(tokenizer, tok_tmp)
            tok_file = tok_tmp
        else:
            tok_file = tok_out
        trained = False
    else:
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        dedup = Deduplicator() if cfg.dedup else None
        scratch = CleanReport()

        def training_texts() -> Iterator[str]:
            for doc in iter_documents(sources, text_key, blank_line_docs, max_documents, None, cfg.max_chars):
                c = clean_and_filter(doc, cfg, scratch)
                if c is not None and (dedup is None or not dedup.seen(digest(c))):
                    yield c

        tok = train_bpe(training_texts(), vocab_size, show_progress=progress)
        del dedup
        if scratch.input_documents - sum(scratch.removed_documents.values()) <= 0:
            raise DataError(f"{', '.join(inputs)}: zero documents left after cleaning\n{scratch.summary()}")
        staged.append((tok_tmp, tok_out))
        with open(tok_tmp, "w", encoding="utf-8") as f:  # what tok.save writes, but a full disk is an OSError
            f.write(tok.to_str(pretty=True))
        tok_file = tok_tmp
        trained = True
    info = tokenizer_info(tok, eod_token, source=tokenizer or tok_out)
    del tok
    manifest, report = _write_data(sources, output_prefix, tok_file, info, text_key, workers, blank_line_docs,
                                   cfg, max_documents, batch_docs, batch_chars, progress, staged)
    manifest.update({
        # Relative to the manifest's folder, so the prepared data can be moved as a whole.
        "tokenizer_file": os.path.basename(tok_out),
        "tokenizer_sha256": sha256_file(tok_file)[1],
        "tokenizer_source": os.path.abspath(tokenizer) if tokenizer else None,
        "tokenizer_trained": trained,
        "vocab_size": info.vocab_size,
        "eod_token_id": info.eod_token_id,
        "bos_token_id": info.bos_token_id,
    })
    if tok_file == tok_tmp:
        with open(tok_tmp, "rb+") as f:
            os.fsync(f.fileno())
    manifest["cleaning"] = manifest.pop("cleaning")  # keep the manifest's key order: cleaning last
    manifest_out = manifest_path(output_prefix)
    staged.append((temporary_name(manifest_out), manifest_out))
    write_text_durably(staged[-1][0], json.dumps(manifest, indent=2) + "\n")
    # The one step that changes what the prefix holds: tokenizer, .bin, .idx, then the manifest.
    replace_together(staged)
    seconds = time.perf_counter() - t0
    print(report.summary(), file=sys.stderr)
    n_docs, n_tokens = manifest["num_documents"], manifest["num_tokens"]
    print(
        f"wrote {output_prefix}.bin/.idx/.json: {n_docs} documents, {n_tokens} tokens "
        f"({manifest['dtype']}) in {seconds:.1f}s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)",
        file=sys.stderr,
    )
    return manifest


def _write_data(
    sources: list[Source],
    output_prefix: str,
    tok_file: str,
    info: TokenizerInfo,
    text_key: str,
    workers: int,
    blank_line_docs: bool,
    cfg: CleanConfig,
    max_documents: int | None,
    batch_docs: int,
    batch_chars: int,
    progress: bool,
    staged: list[tuple[str, str]],
) -> tuple[dict, CleanReport]:
    """Clean, de-duplicate, tokenise and write PREFIX.bin/.idx under temporary names (added to `staged`): (the
    manifest without its tokenizer fields, the cleaning report)."""
    inputs = [s.spec for s in sources]
    dtype = token_dtype(info.vocab_size)
    report = CleanReport()
    dedup = Deduplicator() if cfg.dedup else None
    counts: dict[str, int] = {}
    # Null text and over-long documents are dropped here, as read: they never reach a worker.
    docs = (d for d in iter_documents(sources, text_key, blank_line_docs, max_documents, counts, cfg.max_chars)
            if screen(d, cfg, report) is not None)
    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:

        def consume(result: tuple[bytes, np.ndarray, np.ndarray, np.ndarray, CleanReport]) -> None:
            digests, chars, lengths, tokens, rep = result
            report.merge(rep)
            keep = np.ones(len(lengths), dtype=bool)
            if dedup is not None:
                for i in range(len(lengths)):
                    if dedup.seen(digests[i * 16 : (i + 1) * 16]):
                        keep[i] = False
                report.removed_documents["dedup"] += int((~keep).sum())
                report.removed_chars["dedup"] += int(chars[~keep].sum())
            if not keep.all():
                tokens = tokens[np.repeat(keep, lengths)]
                lengths, chars = lengths[keep], chars[keep]
            report.output_documents += len(lengths)
            report.output_chars += int(chars.sum())
            writer.add_documents(tokens, lengths)
            bar.update(rep.input_documents)
            bar.set_postfix(tokens=writer.num_tokens, refresh=False)

        initargs = (tok_file, info, cfg, dtype.str)
        batches = _batches(docs, batch_docs, batch_chars)
        if workers == 1:
            _init_worker(*initargs)
            for batch in batches:
                consume(_encode_batch(batch))
        else:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold tokenizer threads, and forking a threaded process can deadlock.
            with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
                pending: deque = deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode_batch, (batch,)))
                    if len(pending) >= 2 * workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
        bar.close()
        if writer.num_documents == 0:
            raise DataError(f"{', '.join(inputs)}: zero documents left after cleaning\n{report.summary()}")
        staged += writer.finalize(publish=False)
    manifest = {
        "format": MANIFEST_FORMAT,
        "inputs": [{"input": s.spec, "kind": s.kind, "documents": counts.get(s.spec, 0)} for s in sources],
        "text_key": text_key,
        "num_documents": writer.num_documents,
        "num_tokens": writer.num_tokens,
        "bin": os.path.basename(bin_path(output_prefix)),
        "idx": os.path.basename(idx_path(output_prefix)),
        "dtype": dtype.name,
        "cleaning": {"config": asdict(cfg), "report": report.to_dict()},
    }
    return manifest, report


def manifest_tokenizer(prefix: str | os.PathLike) -> str | None:
    """The tokenizer file a prefix's manifest names (resolved next to the data), or None."""
    name = (read_manifest(prefix) or {}).get("tokenizer_file")
    if not name:
        return None
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(os.fspath(prefix)), name)
