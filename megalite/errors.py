"""The errors megalite raises for bad input. Each message names the file, key or value."""

from __future__ import annotations


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
