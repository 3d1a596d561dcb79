"""Document cleaning: Unicode normalisation, control characters, whitespace, length filters, exact de-duplication.

Each step counts the documents and characters it removed, so `megalite prepare` can report what
cleaning did. De-duplication keeps a fixed-size digest per document (not the text), so its memory
grows with the number of documents only.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field

from megalite.data.sources import Document, Oversized

# C0/C1 control characters except tab and newline; lone surrogates cannot be encoded as UTF-8 at all.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")

STEPS = ("null_text", "normalize", "control", "whitespace", "min_length", "max_length", "dedup")

# The default maximum document size, in characters. Tokenising one document costs about 120 bytes of memory
# per character (code, prose) and about 200 (base64-like text, one token per character) with the byte-level
# BPE of `tokenizers` (a 50 MB one-line document made prepare peak at 5.8 GB); at 1,000,000 characters a
# worker peaks near 160 MB (220 MB for base64-like text), the prepare benchmark's bound (megalite/data/README.md
# has the measurements). The largest file of the built-in corpus (pydoc_data/topics.py) has 756k.
DEFAULT_MAX_CHARS = 1_000_000

# 16 bytes of BLAKE2b: collisions are negligible (2^-64 at 4 billion documents) and the set stays small.
DIGEST_SIZE = 16


@dataclass
class CleanConfig:
    """What cleaning does; the defaults suit code and prose alike (indentation is kept)."""

    normalize: str | None = "NFC"  # NFC, NFKC, NFD, NFKD or None
    remove_control: bool = True
    normalize_whitespace: bool = True
    min_chars: int = 1
    max_chars: int | None = DEFAULT_MAX_CHARS  # None: no limit (memory then grows with the longest document)
    dedup: bool = True


@dataclass
class CleanReport:
    """Documents and characters seen, removed per step, and kept."""

    input_documents: int = 0
    input_chars: int = 0
    removed_documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STEPS})
    removed_chars: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STEPS})
    output_documents: int = 0
    output_chars: int = 0

    def merge(self, other: CleanReport) -> None:
        """Add another report's counts to this one."""
        self.input_documents += other.input_documents
        self.input_chars += other.input_chars
        for s in STEPS:
            self.removed_documents[s] += other.removed_documents[s]
            self.removed_chars[s] += other.removed_chars[s]
        self.output_documents += other.output_documents
        self.output_chars += other.output_chars

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)

    def summary(self) -> str:
        """One line per step that removed something."""
        lines = [f"cleaning: {self.input_documents} documents, {self.input_chars} characters in"]
        for s in STEPS:
            d, c = self.removed_documents[s], self.removed_chars[s]
            if d or c:
                lines.append(f"  {s:<11} removed {d} documents, {c} characters")
        lines.append(f"  kept {self.output_documents} documents, {self.output_chars} characters")
        return "\n".join(lines)


def clean_text(text: str, cfg: CleanConfig, report: CleanReport | None = None) -> str:
    """Normalise one document's text (no filtering); count removed characters in `report`."""
    if cfg.normalize:
        n0 = len(text)
        text = unicodedata.normalize(cfg.normalize, text)
        if report is not None:
            report.removed_chars["normalize"] += max(0, n0 - len(text))
    if cfg.remove_control:
        n0 = len(text)
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if report is not None:
            report.removed_chars["control"] += n0 - len(text)
    if cfg.normalize_whitespace:
        n0 = len(text)
        # Trailing spaces and runs of blank lines carry no content; leading indentation does (code).
        text = _MANY_BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("\n", text)).strip()
        if report is not None:
            report.removed_chars["whitespace"] += n0 - len(text)
    return text


def digest(text: str) -> bytes:
    """The fixed-size content hash used for exact de-duplication."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_SIZE).digest()


def screen(text: Document, cfg: CleanConfig, report: CleanReport) -> str | None:
    """The checks that need no cleaning, as the document was read: null text (a missing value in a Parquet,
    `datasets` or JSON record) and the maximum size. None when the document is dropped (and counted)."""
    if text is None:
        report.input_documents += 1
        report.removed_documents["null_text"] += 1
        return None
    # Before cleaning and tokenising: a huge document is never copied, sent to a worker or tokenised (the
    # line-based readers do not even hold it: they count it and hand over an Oversized).
    chars = text.chars if isinstance(text, Oversized) else len(text)
    if isinstance(text, Oversized) or (cfg.max_chars is not None and chars > cfg.max_chars):
        report.input_documents += 1
        report.input_chars += chars
        report.removed_documents["max_length"] += 1
        report.removed_chars["max_length"] += chars
        return None
    return text


def clean_and_filter(text: Document, cfg: CleanConfig, report: CleanReport) -> str | None:
    """Screen, clean and length-filter one document; None when it is dropped (dedup is separate)."""
    if screen(text, cfg, report) is None:
        return None
    report.input_documents += 1
    report.input_chars += len(text)
    text = clean_text(text, cfg, report)
    if len(text) < cfg.min_chars:
        report.removed_documents["min_length"] += 1
        report.removed_chars["min_length"] += len(text)
        return None
    if cfg.max_chars is not None and len(text) > cfg.max_chars:  # cleaning can lengthen (NFKC, NFD)
        report.removed_documents["max_length"] += 1
        report.removed_chars["max_length"] += len(text)
        return None
    return text


class Deduplicator:
    """Remembers the digest of every document kept; `seen()` is True for an exact repeat."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen(self, key: bytes) -> bool:
        """True if `key` was seen before; remembers it otherwise."""
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def __len__(self) -> int:
        return len(self._seen)
