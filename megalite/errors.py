"""The errors megalite raises for bad input. Each message names the file, key or value."""

from __future__ import annotations

import reprlib
from typing import Any

# About this many characters of a value the user gave are echoed in a message; a longer one is cut, with its size.
ECHO_LIMIT = 80


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr (a few items of a container, a few levels deep), with long strings cut to
    `ECHO_LIMIT` characters and their length said."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = ECHO_LIMIT
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 8
        self.maxlevel = 3

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= self.maxstring else f"{x[:self.maxstring]!r}... ({len(x):,} characters)"


_SHORT = _ShortRepr()


def shown(value: Any, quote: bool = True) -> str:
    """A value the user gave (a config value or key, a command-line argument), as an error message echoes it:
    its repr (quote=False: a string as it is), cut to about ECHO_LIMIT characters with its full length said, so
    that a 100 MB bad value makes a one-line message."""
    if isinstance(value, str) and not quote:
        return value if len(value) <= ECHO_LIMIT else f"{value[:ECHO_LIMIT]}... ({len(value):,} characters)"
    return _SHORT.repr(value)


class MegaliteError(Exception):
    """Base class of every error megalite raises on purpose."""


class ConfigError(MegaliteError):
    """A configuration is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} configuration errors:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class DataError(MegaliteError):
    """Input data (text, tokenizer, indexed dataset) is missing or malformed."""


class CheckpointError(MegaliteError):
    """A checkpoint is missing, incomplete, corrupt or unsafe to load."""
