"""`megalite eval`: loss, perplexity and next-token accuracy of a checkpoint on a data split."""

from __future__ import annotations

import argparse
import json
import math

import torch


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 8, max_samples: int | None = None) -> dict:  # noqa: ANN001
    """Token-weighted mean loss, perplexity, accuracy and token count over `dataset` (one process)."""
    from megalite.data import collate

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
    import numpy as np

    from megalite.data import IndexedDataset
    from megalite.data.dataset import parse_split, split_ranges

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite eval`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory, root, or run directory")
    parser.add_argument("--data", default=None, help="data prefix (default: the run's)")
    parser.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many samples")
    parser.add_argument("--unigram", action="store_true", help="also report a unigram model's perplexity")


def main(args: argparse.Namespace) -> int:
    """Print one JSON object: loss, perplexity, accuracy, tokens (and the unigram baseline if asked)."""
    from megalite.data import build_datasets
    from megalite.engine.consolidate import model_from_checkpoint
    from megalite.errors import DataError

    cfg, model, step_dir = model_from_checkpoint(args.checkpoint)
    prefixes = [args.data] if args.data else cfg.data.prefixes
    sets = build_datasets(prefixes, None if args.data else cfg.data.weights, cfg.data.split, cfg.data.seq_length,
                          cfg.train.seed, cache_dir=cfg.data.cache_dir, vocab_size=cfg.model.vocab_size,
                          reset_position_ids=cfg.data.reset_position_ids, eod_mask_loss=cfg.data.eod_mask_loss,
                          reset_attention_mask=cfg.data.reset_attention_mask)
    dataset = sets[{"train": 0, "valid": 1, "test": 2}[args.split]]
    if dataset is None:
        raise DataError(f"split {cfg.data.split!r} has no {args.split} set for {prefixes}")
    result = {"checkpoint": str(step_dir), "split": args.split,
              **evaluate_model(model, dataset, args.batch_size, args.max_samples)}
    if args.unigram:
        result["unigram_perplexity"] = unigram_perplexity(prefixes[0], cfg.data.split, args.split)
        result["perplexity_ratio_to_unigram"] = result["perplexity"] / result["unigram_perplexity"]
    print(json.dumps(result))
    return 0
