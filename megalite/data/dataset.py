"""GPT training samples from indexed datasets: document splits, packing, shuffling, blending.

Packing (as Megatron's GPTDataset): the documents of a split, shuffled per epoch, are laid end to end
into one token stream; sample j is tokens [j*seq, j*seq + seq + 1) of that stream, so consecutive samples
share one token and nothing is padded. Samples are then shuffled. Both orders come from the seed.

The order arrays are built once per (prefix, split, seq_length, samples, seed) and cached as `.npy`
files (by default in `<data folder>/megalite_cache/`). Who builds: global rank 0 when torch.distributed
is initialised, else the calling process; the other ranks poll for the finished files and give up with
a DataError after `wait_timeout_s` (they also stop at once if rank 0 leaves an error marker). Every
rank checks its inputs (files, manifest, vocabulary, split) itself before any waiting, so bad input
fails on every rank within seconds. If the cache folder is not writable, every rank computes the
(deterministic) arrays in memory instead. The cache folder must be shared by all ranks (or be
pre-built): a rank that cannot see rank 0's files waits until the timeout and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megalite.data.indexed import IndexedDataset, bin_path, idx_path, manifest_path, read_manifest
from megalite.distributed import rank as global_rank
from megalite.errors import DataError, shown
from megalite.files import atomic_write_text

SPLIT_NAMES = ("train", "valid", "test")
CACHE_VERSION = 1
DEFAULT_WAIT_TIMEOUT_S = 600.0
_POLL_S = 0.05


def parse_split(split: str) -> list[float]:
    """'949,50,1' -> three weights summing to 1 (missing trailing parts are 0)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError as e:
        raise DataError(f"split {shown(split)}: expected up to three comma-separated numbers like '949,50,1'") from e
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"split {shown(split)}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(weights: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges per split, rounded as Megatron does."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def cached_arrays(
    cache_dir: str,
    key: str,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    description: dict | None = None,
) -> dict[str, np.ndarray]:
    """Arrays built once by the first rank and memory-mapped by all; see the module docstring."""
    base = os.path.join(cache_dir, key)
    done, error = base + ".done.json", base + ".error"
    paths = {n: f"{base}.{n}.npy" for n in names}

    def load() -> dict[str, np.ndarray]:
        try:
            return {n: np.load(p, mmap_mode="r") for n, p in paths.items()}
        except (OSError, ValueError) as e:
            raise DataError(f"{base}.*.npy: unreadable cache file ({e}); delete {done} to rebuild") from e

    if os.path.exists(done):
        return load()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(f"{cache_dir}: not writable; every rank computes the sample order in memory", stacklevel=2)
        return build()
    if global_rank() == 0:
        if os.path.exists(error):
            os.unlink(error)
        try:
            arrays = build()
            for n, p in paths.items():
                tmp = f"{p}.{os.getpid()}.tmp.npy"
                np.save(tmp, arrays[n])
                os.replace(tmp, p)
            atomic_write_text(done, json.dumps(description or {}, indent=1))
        except BaseException as e:
            # Tell the waiting ranks right away instead of letting them run into their timeout. Atomically: a rank
            # polling for the file never reads it half-written (empty).
            try:
                atomic_write_text(error, f"{type(e).__name__}: {e}")
            except OSError:
                pass
            if isinstance(e, (DataError, KeyboardInterrupt, SystemExit)):
                raise
            raise DataError(f"{base}: building the sample order failed: {type(e).__name__}: {e}") from e
        return load()
    deadline = time.monotonic() + wait_timeout_s
    while not os.path.exists(done):
        if os.path.exists(error):
            with open(error) as f:
                raise DataError(f"{base}: rank 0 failed to build the sample order: {f.read()}")
        if time.monotonic() > deadline:
            raise DataError(
                f"{done}: not written by rank 0 within {wait_timeout_s:.0f}s; is {cache_dir} shared by all ranks "
                "(set data.cache_dir to a shared folder) and did rank 0 reach build_datasets?"
            )
        time.sleep(_POLL_S)
    return load()


def _arrays_by_name(state: dict, names: tuple[str, ...]) -> dict:
    """A picklable copy of `state` whose memory-mapped cache arrays travel as file names, not as copies
    (a DataLoader worker maps them again)."""
    state = dict(state)
    for name in names:
        arr = state[name]
        if isinstance(arr, np.memmap) and arr.filename:
            state[name] = ("__npy__", arr.filename)
    return state


def _arrays_mapped(state: dict, names: tuple[str, ...]) -> dict:
    """The inverse of `_arrays_by_name`."""
    for name in names:
        if isinstance(state[name], tuple):
            state[name] = np.load(state[name][1], mmap_mode="r")
    return state


class GPTDataset(torch.utils.data.Dataset):
    """Packed samples of `seq_length + 1` tokens from some documents of an indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: np.ndarray,
        seq_length: int,
        seed: int,
        num_samples: int | None = None,
        name: str = "train",
        cache_dir: str | None = None,
        eod_token_id: int = 0,
        reset_position_ids: bool = False,
        eod_mask_loss: bool = False,
        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        reset_attention_mask: bool = False,
    ):
        self.indexed = indexed
        self.seq_length = int(seq_length)
        self.eod_token_id = int(eod_token_id)
        self.reset_position_ids = reset_position_ids
        self.eod_mask_loss = eod_mask_loss
        self.reset_attention_mask = reset_attention_mask
        documents = np.asarray(documents, dtype=np.int64)
        lengths = indexed.sequence_lengths
        self.tokens_per_epoch = int(lengths[documents].sum(dtype=np.int64)) if documents.size else 0
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // self.seq_length)
        if self.samples_per_epoch == 0:
            raise DataError(
                f"{indexed.prefix}: the {name} set ({documents.size} documents, {self.tokens_per_epoch} tokens) "
                f"is shorter than one sample of seq_length+1 = {self.seq_length + 1} tokens"
            )
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise DataError(f"{indexed.prefix}: {name} set asked for {self.num_samples} samples")
        # Enough epochs that the stream holds num_samples samples (each needs seq+1 tokens, sharing one).
        self.num_epochs = -(-(self.num_samples * self.seq_length + 1) // self.tokens_per_epoch)
        describe = {
            "version": CACHE_VERSION,
            "prefix": os.path.basename(indexed.prefix),
            "documents": [int(documents[0]), int(documents[-1]) + 1, int(documents.size)],
            "tokens": self.tokens_per_epoch,
            # The order arrays depend only on the documents' lengths: a re-prepared prefix gets a new cache.
            "lengths_blake2b": hashlib.blake2b(
                np.ascontiguousarray(lengths[documents]).tobytes(), digest_size=16
            ).hexdigest(),
            "seq_length": self.seq_length,
            "num_samples": self.num_samples,
            "seed": int(seed),
            "name": name,
        }
        key = f"{os.path.basename(indexed.prefix)}.{name}." + hashlib.sha256(
            json.dumps(describe, sort_keys=True).encode()
        ).hexdigest()[:16]

        def build() -> dict[str, np.ndarray]:
            rng = np.random.Generator(np.random.PCG64([int(seed), 0x6D6C]))  # a named stream: "ml"
            order = [rng.permutation(documents) for _ in range(self.num_epochs)]
            doc_idx = np.concatenate(order).astype(np.int32 if documents[-1] < 2**31 else np.int64)
            offsets = np.zeros(doc_idx.size + 1, dtype=np.int64)
            np.cumsum(lengths[doc_idx], out=offsets[1:])
            shuffle = rng.permutation(self.num_samples).astype(np.int64)
            return {"doc_idx": doc_idx, "offsets": offsets, "shuffle_idx": shuffle}

        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "megalite_cache")
        self.cache_key = key
        arrays = cached_arrays(cache_dir, key, ("doc_idx", "offsets", "shuffle_idx"), build, wait_timeout_s, describe)
        self.doc_idx, self.offsets, self.shuffle_idx = arrays["doc_idx"], arrays["offsets"], arrays["shuffle_idx"]
        self._starts = indexed.sequence_pointers // indexed.dtype.itemsize  # token offset of each document

    def __getstate__(self) -> dict:
        state = _arrays_by_name(self.__dict__, ("doc_idx", "offsets", "shuffle_idx"))
        del state["_starts"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_arrays_mapped(state, ("doc_idx", "offsets", "shuffle_idx")))
        self._starts = self.indexed.sequence_pointers // self.indexed.dtype.itemsize

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i (int64)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples}")
        start = int(self.shuffle_idx[i]) * self.seq_length
        end = start + self.seq_length + 1
        d = int(np.searchsorted(self.offsets, start, side="right")) - 1
        flat = self.indexed.tokens
        pieces = []
        while start < end:
            doc = int(self.doc_idx[d])
            doc_lo, doc_hi = int(self.offsets[d]), int(self.offsets[d + 1])
            take = min(end, doc_hi) - start
            s = int(self._starts[doc]) + (start - doc_lo)
            pieces.append(flat[s : s + take])
            start += take
            d += 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return make_sample(self.tokens(i), self.eod_token_id, self.reset_position_ids, self.eod_mask_loss,
                           self.reset_attention_mask)


def make_sample(
    tokens: np.ndarray, eod: int, reset_position_ids: bool, eod_mask_loss: bool, reset_attention_mask: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids/labels/loss_mask/position_ids from seq+1 tokens, with Megatron's three EOD options.

    reset_attention_mask adds document_ids: a new document starts after each EOD input token, and the model
    attends only within documents.
    """
    t = torch.from_numpy(tokens)
    input_ids, labels = t[:-1].clone(), t[1:].clone()
    n = input_ids.numel()
    is_eod = input_ids == eod
    loss_mask = torch.ones(n, dtype=torch.float32)
    if eod_mask_loss:
        # As Megatron: no loss where the input is EOD (predicting a new document's first token from nothing).
        loss_mask[is_eod] = 0.0
    position_ids = torch.arange(n, dtype=torch.long)
    if reset_position_ids:
        # Positions restart right after each EOD: the segment start is the last index following an EOD.
        restart = torch.zeros(n, dtype=torch.long)
        after = torch.nonzero(is_eod[:-1]).flatten() + 1
        restart[after] = after
        position_ids = position_ids - torch.cummax(restart, dim=0).values
    sample = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if reset_attention_mask:
        document_ids = torch.zeros(n, dtype=torch.long)
        document_ids[1:] = torch.cumsum(is_eod[:-1].long(), dim=0)  # the EOD ends its document
        sample["document_ids"] = document_ids
    return sample


def blend_counts(weights: list[float], size: int) -> list[int]:
    """Split `size` samples among datasets by weight (largest remainder: exact total)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    exact = w * size
    counts = np.floor(exact).astype(np.int64)
    rest = size - int(counts.sum())
    if rest:
        counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return [int(c) for c in counts]


class BlendedDataset(torch.utils.data.Dataset):
    """Interleaves datasets: dataset d gives `counts[d]` samples spread evenly over the blend.

    With `cache_dir` the order (10 bytes a sample) is built once by rank 0 and memory-mapped by every
    rank, like the components' own orders, instead of being sorted again in each rank's memory.
    """

    def __init__(
        self,
        datasets: list[torch.utils.data.Dataset],
        counts: list[int],
        cache_dir: str | None = None,
        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    ):
        if len(datasets) != len(counts):
            raise DataError(f"blend: {len(datasets)} datasets but {len(counts)} counts")
        for ds, c in zip(datasets, counts):
            if c > len(ds):
                raise DataError(f"blend: {c} samples wanted from a dataset of {len(ds)}")
        self.datasets = datasets
        self.counts = counts

        def build() -> dict[str, np.ndarray]:
            # Sample k of dataset d sits at (k + 0.5) / counts[d] of the way through: a deterministic, even mix.
            keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
            ds_ids = np.concatenate([np.full(c, d, dtype=np.int16) for d, c in enumerate(counts)])
            order = np.lexsort((ds_ids, keys))
            del keys
            samples = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])[order]
            return {"dataset_index": ds_ids[order], "dataset_sample_index": samples}

        # The order depends only on the counts; the components' keys name the data it indexes.
        components = [getattr(ds, "cache_key", None) for ds in datasets]
        if cache_dir is None or None in components:
            arrays = build()
        else:
            describe = {"version": CACHE_VERSION, "components": components, "counts": [int(c) for c in counts]}
            key = "blend." + hashlib.sha256(json.dumps(describe, sort_keys=True).encode()).hexdigest()[:16]
            arrays = cached_arrays(cache_dir, key, ("dataset_index", "dataset_sample_index"), build, wait_timeout_s,
                                   describe)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]

    def __getstate__(self) -> dict:
        return _arrays_by_name(self.__dict__, ("dataset_index", "dataset_sample_index"))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_arrays_mapped(state, ("dataset_index", "dataset_sample_index")))

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def _open_prefix(prefix: str, eod_token_id: int | None, vocab_size: int | None) -> tuple[IndexedDataset, int, dict]:
    files = [idx_path(prefix), bin_path(prefix), manifest_path(prefix)]
    if not any(os.path.exists(f) for f in files):
        folder = os.path.dirname(os.path.abspath(prefix))
        where = "" if os.path.isdir(folder) else f"; the folder {folder} does not exist either"
        raise DataError(
            f"{prefix}: data prefix not found: none of {', '.join(os.path.basename(f) for f in files)} exists"
            f"{where}. Check data.prefixes (a prefix is the path without extension) or write it with "
            f"`megalite prepare --output-prefix {prefix}`"
        )
    indexed = IndexedDataset(prefix)  # a missing or damaged .idx/.bin is named before the manifest is asked
    manifest = read_manifest(prefix) or {}
    eod = eod_token_id if eod_token_id is not None else manifest.get("eod_token_id")
    if eod is None:
        why = "has no eod_token_id" if manifest else "does not exist (data prepared by another tool?)"
        raise DataError(
            f"{manifest_path(prefix)}: the manifest {why}; the end-of-document token id is needed: "
            'write it there as {"eod_token_id": N} (`megalite prepare` writes this manifest)'
        )
    data_vocab = manifest.get("vocab_size")
    if vocab_size is not None:
        ids = [i for i in (data_vocab and data_vocab - 1, eod, manifest.get("bos_token_id")) if i is not None]
        if ids and max(ids) >= vocab_size:
            raise DataError(
                f"{prefix}.json: the data's tokenizer ({manifest.get('tokenizer_file', '?')}) has ids up to "
                f"{max(ids)}, beyond the model's vocabulary of {vocab_size}; raise model.vocab_size to at least "
                f"{max(ids) + 1} or prepare the data with a smaller tokenizer"
            )
    return indexed, int(eod), manifest


def build_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int] | None = None,
    cache_dir: str | None = None,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
    eod_token_id: int | None = None,
    vocab_size: int | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    reset_attention_mask: bool = False,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """(train, valid, test) datasets of packed samples, blended over prefixes; None for an unused split."""
    if not prefixes:
        raise DataError("data.prefixes is empty: give at least one prefix written by `megalite prepare`")
    if weights is not None:
        if len(weights) != len(prefixes):
            raise DataError(f"data.weights has {len(weights)} entries for {len(prefixes)} prefixes")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"data.weights {weights}: need non-negative weights with a positive sum")
    if seq_length < 1:
        raise DataError(f"seq_length {seq_length}: must be positive")
    if seed < 0:
        raise DataError(f"seed {seed}: must be non-negative")
    if num_samples is not None and (len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples)):
        raise DataError(f"num_samples {num_samples}: expected three non-negative counts (train, valid, test)")
    split_w = parse_split(split)
    opened = [_open_prefix(p, eod_token_id, vocab_size) for p in prefixes]
    shas = {m.get("tokenizer_sha256") for _, _, m in opened if m.get("tokenizer_sha256")}
    if len(shas) > 1:
        raise DataError(f"prefixes {prefixes} were tokenised with different tokenizers; blend data of one tokenizer")

    out: list[torch.utils.data.Dataset | None] = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = None if num_samples is None else num_samples[s]
        if wanted == 0 or (split_w[s] == 0 and wanted is None):
            out.append(None)
            continue
        if split_w[s] == 0:
            raise DataError(f"split {split!r} gives the {name} set no documents, but {wanted} samples are needed")
        parts = []
        for (ds, eod, _), prefix in zip(opened, prefixes):
            lo, hi = split_ranges(split_w, len(ds))[s]
            if hi <= lo:
                raise DataError(
                    f"{prefix}: split {split!r} leaves the {name} set empty: its share, {split_w[s]:.2%} of the "
                    f"{len(ds)} documents ({split_w[s] * len(ds):.2f}), rounds to no document; use more documents "
                    f"or a larger {name} share in data.split"
                )
            parts.append((ds, eod, np.arange(lo, hi, dtype=np.int64)))

        def make(ds: IndexedDataset, eod: int, docs: np.ndarray, n: int | None, name: str = name) -> GPTDataset:
            return GPTDataset(ds, docs, seq_length, seed, n, name, cache_dir, eod, reset_position_ids, eod_mask_loss,
                              wait_timeout_s, reset_attention_mask)

        if len(parts) == 1:
            out.append(make(*parts[0], wanted))
            continue
        # Per-prefix one-epoch sizes decide the default mixture and the default blend size.
        epoch = []
        for ds, _, docs in parts:
            tokens = int(ds.sequence_lengths[docs].sum(dtype=np.int64))
            epoch.append(max(0, (tokens - 1) // seq_length))
        w = weights if weights is not None else epoch
        total = wanted if wanted is not None else sum(epoch)
        counts = blend_counts(list(w), total)
        comps, comp_counts = [], []
        for (ds, eod, docs), c in zip(parts, counts):
            if c > 0:
                comps.append(make(ds, eod, docs, c))
                comp_counts.append(c)
        out.append(BlendedDataset(comps, comp_counts, cache_dir or default_cache_dir(prefixes[0]), wait_timeout_s))
    return out[0], out[1], out[2]


def default_cache_dir(prefix: str) -> str:
    """Where the sample order of a prefix is cached unless cache_dir is given."""
    return str(Path(prefix).resolve().parent / "megalite_cache")


def collate(items: list[dict[str, torch.Tensor]], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Stack samples (dicts of equal-shape tensors) into one micro-batch, optionally on `device`."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return batch if device is None else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
