"""Loss, perplexity and next-token accuracy of a model or checkpoint on a data split (`megalite eval`)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from megalite.checkpoint.consolidate import model_from_checkpoint
from megalite.data import IndexedDataset, build_datasets, collate
from megalite.data.dataset import parse_split, split_ranges
from megalite.data.prepare import read_manifest
from megalite.errors import ConfigError, DataError

SPLITS = {"train": 0, "valid": 1, "test": 2}


def check_eval_options(batch_size: int, max_samples: int | None, names: dict[str, str] | None = None) -> None:
    """Raise a ConfigError naming each bad option: batch_size and max_samples (None: all) are integers >= 1."""
    names = names or {"batch_size": "batch_size", "max_samples": "max_samples"}
    problems = []
    for key, value, optional in (("batch_size", batch_size, False), ("max_samples", max_samples, True)):
        if optional and value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            problems.append(f"{names[key]} {value!r}: must be an integer >= 1")
    if problems:
        raise ConfigError(problems)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 8, max_samples: int | None = None) -> dict:  # noqa: ANN001
    """Token-weighted mean loss, perplexity, accuracy and token count over the first `max_samples` samples of
    `dataset` (default all), on one process. Loss and accuracy count the tokens whose loss mask is set."""
    check_eval_options(batch_size, max_samples)
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    tokens = 0
    vocab = model.config.vocab_size
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        batch = collate(items)
        # The dataset's positions and documents follow the run's data options (reset_position_ids, ...).
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch.get("document_ids"),
                       gather_logits=True)[..., :vocab].float()  # (B, T, V)
        mask = batch["loss_mask"] > 0
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        total_loss += per_token[mask].double().sum()
        correct += int((logits.argmax(-1) == batch["labels"])[mask].sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise DataError(f"the evaluation set ({n} samples) has no token to score: every loss-mask entry is 0")
    loss = (total_loss / tokens).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / tokens, "tokens": tokens}


def unigram_perplexity(prefix: str, split: str, which: str, vocab_size: int | None = None) -> float:
    """Perplexity on the `which` split of a unigram model fitted on the training split's documents, with add-one
    smoothing over the vocabulary: p(t) = (count(t) + 1) / (training tokens + vocabulary size). The vocabulary
    size is `vocab_size`, else the prefix manifest's, else the largest token id seen + 1."""
    ds = IndexedDataset(prefix)
    ranges = split_ranges(parse_split(split), len(ds))

    def tokens(name: str) -> np.ndarray:
        lo, hi = ranges[SPLITS[name]]
        if hi <= lo:
            raise DataError(f"{prefix}: split {split!r} leaves the {name} set empty ({len(ds)} documents in all)")
        # Documents lie back to back in the .bin file, so a split is one contiguous run of tokens.
        start = int(ds.sequence_pointers[lo]) // ds.dtype.itemsize
        end = int(ds.sequence_pointers[hi - 1]) // ds.dtype.itemsize + int(ds.sequence_lengths[hi - 1])
        return np.asarray(ds.tokens[start:end], dtype=np.int64)

    train, measured = tokens("train"), tokens(which)
    if vocab_size is None:
        vocab_size = (read_manifest(prefix) or {}).get("vocab_size")
    seen = int(max(train.max(), measured.max())) + 1
    size = int(vocab_size) if vocab_size is not None else seen
    if seen > size:
        raise DataError(f"{prefix}: token id {seen - 1} is outside the vocabulary of {size}")
    counts = np.bincount(train, minlength=size).astype(np.float64)
    log_probs = np.log((counts + 1.0) / (train.size + size))
    return math.exp(-float(log_probs[measured].sum()) / measured.size)


def evaluate_checkpoint(checkpoint: str, data: str | None = None, split: str = "valid", batch_size: int = 8,
                        max_samples: int | None = None, unigram: bool = False) -> dict:
    """Evaluate a checkpoint of any layout on its run's data (or `data`): the dict `megalite eval` prints."""
    check_eval_options(batch_size, max_samples)  # before the (slow) load
    cfg, model, step_dir = model_from_checkpoint(checkpoint)
    prefixes = [data] if data else cfg.data.prefixes
    which = SPLITS[split]
    # Only the evaluated split is built: an empty other split is no error here, and an error names this one.
    only = tuple(None if i == which else 0 for i in range(3))
    sets = build_datasets(prefixes, None if data else cfg.data.weights, cfg.data.split, cfg.data.seq_length,
                          cfg.train.seed, num_samples=only, cache_dir=cfg.data.cache_dir,
                          vocab_size=cfg.model.vocab_size, reset_position_ids=cfg.data.reset_position_ids,
                          eod_mask_loss=cfg.data.eod_mask_loss, reset_attention_mask=cfg.data.reset_attention_mask)
    dataset = sets[which]
    if dataset is None:
        raise DataError(f"data.split {cfg.data.split!r} gives the {split} set a share of 0 for {prefixes}; "
                        "evaluate another split (--split)")
    result = {"checkpoint": str(step_dir), "split": split,
              **evaluate_model(model, dataset, batch_size, max_samples)}
    if unigram:
        result["unigram_perplexity"] = unigram_perplexity(prefixes[0], cfg.data.split, split, cfg.model.vocab_size)
        result["perplexity_ratio_to_unigram"] = result["perplexity"] / result["unigram_perplexity"]
    return result
