"""`megalite eval`: loss, perplexity and next-token accuracy of a checkpoint on a data split (one JSON object)."""

from __future__ import annotations

import argparse

from megalite.commands.output import emit_json

HELP = "loss, perplexity and accuracy of a checkpoint"


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
    from megalite.evaluate import check_eval_options, evaluate_checkpoint

    check_eval_options(args.batch_size, args.max_samples, names={"batch_size": "--batch-size",
                                                                  "max_samples": "--max-samples"})
    emit_json(evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.max_samples,
                                  args.unigram))
    return 0
