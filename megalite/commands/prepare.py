"""`megalite prepare`: clean, tokenize and index a corpus (Megatron .bin/.idx)."""

from __future__ import annotations

import argparse

from megalite.data.clean import DEFAULT_MAX_CHARS, CleanConfig
from megalite.data.prepare import DEFAULT_VOCAB_SIZE, prepare
from megalite.errors import shown

HELP = "clean, tokenize and index a corpus (Megatron .bin/.idx)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `megalite prepare`'s options to its subparser."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, directories, save_to_disk datasets, dataset names (hf:NAME[:SPLIT]) or 'stdlib'")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin/.idx/.json")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE", help="a `tokenizers` JSON file to use")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help=f"train a byte-level BPE of N tokens (default {DEFAULT_VOCAB_SIZE} without --tokenizer)")
    parser.add_argument("--eod-token", metavar="TOKEN", help="end-of-document token of --tokenizer (default: found)")
    parser.add_argument("--text-key", default="text", help="field holding the text in JSON/Parquet/datasets")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
    parser.add_argument("--blank-line-docs", action="store_true",
                        help="text files: one document per blank-line-separated block (default: per file)")
    parser.add_argument("--normalize", default="NFC", choices=["NFC", "NFKC", "NFD", "NFKD", "none"],
                        help="Unicode normalisation")
    parser.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this after cleaning")
    parser.add_argument("--max-chars", type=_max_chars, default=DEFAULT_MAX_CHARS, metavar="N|none",
                        help=f"drop documents longer than N characters, as read (before any cleaning or "
                        f"tokenising) and after cleaning; counted in the report (default {DEFAULT_MAX_CHARS:,}: "
                        "tokenising costs about 120-200 bytes of memory per character; 'none': no limit)")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    parser.add_argument("--max-documents", type=int, default=None, help="read only the first N input documents")
    parser.add_argument("--batch-docs", type=int, default=256, help="documents per worker batch")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")


def _max_chars(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (or 'none' for no limit)")
    return value


def main(args: argparse.Namespace) -> int:
    """Run `megalite prepare`; DataError propagates to the CLI, which prints it."""
    cfg = CleanConfig(
        normalize=None if args.normalize == "none" else args.normalize,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        dedup=not args.no_dedup,
    )
    prepare(
        args.input,
        args.output_prefix,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_key=args.text_key,
        workers=args.workers,
        blank_line_docs=args.blank_line_docs,
        clean=cfg,
        eod_token=args.eod_token,
        max_documents=args.max_documents,
        batch_docs=args.batch_docs,
        progress=args.progress,
    )
    return 0
