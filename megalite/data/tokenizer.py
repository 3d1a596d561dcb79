"""Tokenizers for `megalite prepare`: load a `tokenizers` JSON file or train a byte-level BPE from a stream.

`tokenizers` is imported inside functions so that importing this module (and `megalite --help`) stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from megalite.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# Names tokenizers in the wild use for their end-of-document token, most common first.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>", "<|im_end|>")
MIN_BPE_VOCAB = 256 + 1  # every byte plus the end-of-document token


@dataclass
class TokenizerInfo:
    """The ids `prepare` needs from a tokenizer."""

    vocab_size: int  # max id + 1, added tokens included
    eod_token_id: int
    bos_token_id: int | None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a `tokenizers` JSON file; DataError naming the file when it is missing or unreadable."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise DataError(f"{path}: not a `tokenizers` JSON file ({e})") from e


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Any:
    """Train a byte-level BPE with an end-of-document special token from a streaming iterator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    # train_from_iterator pulls text lazily and keeps only word counts, never the corpus.
    tok.train_from_iterator(_batched(texts, 256), trainer=trainer)
    return tok


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenizer_info(tok: Any, eod_token: str | None = None, source: str = "tokenizer") -> TokenizerInfo:
    """Find the vocabulary size, the end-of-document id and the beginning-of-sequence id (if any)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1 if vocab else 0
    if eod_token is not None:
        if eod_token not in vocab:
            raise DataError(f"{source}: end-of-document token {eod_token!r} is not in the vocabulary")
        eod = vocab[eod_token]
    else:
        found = [c for c in EOD_CANDIDATES if c in vocab]
        if not found:
            raise DataError(
                f"{source}: no end-of-document token found (looked for {', '.join(EOD_CANDIDATES)}); "
                "name it with --eod-token"
            )
        eod = vocab[found[0]]
    # A tokenizer "defines" a BOS token when its post-processor puts one in front of every sequence.
    plain = tok.encode("a", add_special_tokens=False).ids
    with_special = tok.encode("a", add_special_tokens=True).ids
    bos = None
    if len(with_special) > len(plain) and with_special[1 : 1 + len(plain)] == plain:
        bos = with_special[0]
    return TokenizerInfo(vocab_size=vocab_size, eod_token_id=eod, bos_token_id=bos)
