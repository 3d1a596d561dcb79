"""A command's result on stdout, and nothing else there.

`megalite.cli.main` runs every command with `sys.stdout` redirected to stderr, so that a library that
prints or logs to stdout (DeepSpeed's logger writes to stdout) cannot mix its lines into the result; the
command writes its result through `emit`, which goes to the real stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

_result_stream: TextIO | None = None


def set_result_stream(stream: TextIO | None) -> None:
    """Where `emit` writes (the CLI sets the real stdout; None: the current sys.stdout)."""
    global _result_stream
    _result_stream = stream


def emit(text: str) -> None:
    """Write one line of the command's result."""
    stream = _result_stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def emit_json(obj: Any) -> None:
    """Write the command's result as one JSON object on one line."""
    emit(json.dumps(obj))
