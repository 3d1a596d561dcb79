"""Loss, perplexity and next-token accuracy of a model or checkpoint on a data split (`megalite eval`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from megalite.checkpoint.consolidate import model_from_checkpoint
from megalite.data import IndexedDataset, build_datasets, collate
from megalite.data.dataset import parse_split, split_ranges
from megalite.errors import DataError


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 8, max_samples: int | None = None) -> dict:  # noqa: ANN001
    """Token-weighted mean loss, perplexity, accuracy and token count over `dataset` (one process)."""
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
        raise ValueError("the evaluation split has no tokens")
    loss = (total_loss / tokens).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / tokens, "tokens": tokens}


def unigram_perplexity(prefix: str, split: str, which: str) -> float:
    """Perplexity of a unigram model fitted on the training documents, measured on the `which` split."""
    ds = IndexedDataset(prefix)
    ranges = split_ranges(parse_split(split), len(ds))
    lo, hi = ranges[0]
    counts = None
    for i in range(lo, hi):
        c = np.bincount(np.asarray(ds[i], dtype=np.int64))
        counts = c if counts is None else np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(
            c, (0, max(0, len(counts) - len(c))))
    lo, hi = ranges[{"train": 0, "valid": 1, "test": 2}[which]]
    size = max(len(counts), max(int(np.max(ds[i])) for i in range(lo, hi)) + 1)
    probs = (np.pad(counts, (0, size - len(counts))) + 1.0) / (counts.sum() + size)  # add-one smoothing
    nll, n = 0.0, 0
    for i in range(lo, hi):
        doc = np.asarray(ds[i], dtype=np.int64)
        nll -= float(np.log(probs[doc]).sum())
        n += len(doc)
    return math.exp(nll / n)


def evaluate_checkpoint(checkpoint: str, data: str | None = None, split: str = "valid", batch_size: int = 8,
                        max_samples: int | None = None, unigram: bool = False) -> dict:
    """Evaluate a checkpoint of any layout on its run's data (or `data`): the dict `megalite eval` prints."""
    cfg, model, step_dir = model_from_checkpoint(checkpoint)
    prefixes = [data] if data else cfg.data.prefixes
    which = {"train": 0, "valid": 1, "test": 2}[split]
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
        result["unigram_perplexity"] = unigram_perplexity(prefixes[0], cfg.data.split, split)
        result["perplexity_ratio_to_unigram"] = result["perplexity"] / result["unigram_perplexity"]
    return result
