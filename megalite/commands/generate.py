"""`megalite generate`: sample text from a checkpoint with a KV cache; the text alone on stdout (rank 0)."""

from __future__ import annotations

import argparse

from megalite.commands.output import emit

HELP = "sample text from a checkpoint"
OPTION_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite generate`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory, root, or run directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help=">= 1: at most this many (fewer at the end of a document or of the model's context)")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 means greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="in [0, 1]: sample among the most likely tokens holding this much probability mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    parser.add_argument("--ignore-eod", action="store_true",
                        help="continue past the end-of-document token instead of stopping there")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checks)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """Load, generate, print the text (rank 0)."""
    from megalite.distributed import is_main
    from megalite.generate import check_sampling_options, generate_text

    # Generating nothing is a mistake on the command line (the README's rule), unlike in the Python API.
    check_sampling_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, names=OPTION_NAMES,
                           min_new_tokens=1)
    text = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                         args.seed, args.tokenizer, use_cache=not args.no_cache, stop_at_eod=not args.ignore_eod)
    if is_main():
        emit(text)
    return 0
