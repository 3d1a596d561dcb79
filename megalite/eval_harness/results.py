"""The result file of `megalite eval --tasks --output FILE`: checked before anything loads, and never lost after an
evaluation (which can take hours): when FILE cannot be written at the end, the results go to the first place that
takes them, and the error says where.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from megalite.errors import ConfigError, MegaliteError
from megalite.files import atomic_write_text


def output_problems(path: str, flag: str = "--output") -> list[str]:
    """Why `path` cannot take a result file (an existing directory, a parent that is a file, a folder this process
    cannot write in); [] when it can. The folders it needs are created when the file is written."""
    target = Path(path)
    if path.endswith(("/", os.sep)) or target.is_dir():
        return [f"{flag} {path}: is a directory; give a file name, e.g. {target / 'results.json'}"]
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"{flag} {path}: {ancestor} is a file, not a folder"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"{flag} {path}: cannot write in {ancestor} (permission denied)"]
    return []


def check_output(path: str | None, flag: str = "--output") -> None:
    """ConfigError naming `flag` when `path` cannot take the result file (None: no file asked for)."""
    if path is not None:
        problems = output_problems(path, flag)
        if problems:
            raise ConfigError(problems)


def write_results(text: str, path: str, flag: str = "--output") -> None:
    """Write `text` to `path` (atomically, creating its folders). If that fails, write it next to `path`, in the
    current folder or in the temporary folder, whichever takes it first (as a last resort, to stderr), and raise a
    MegaliteError saying what failed and where the results are."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return
    except OSError as e:
        failure = f"{type(e).__name__}: {e.strerror or e}"
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target = Path(path)
    fallbacks = [target.with_name(f"{target.name}.unsaved-{stamp}.json"),
                 Path.cwd() / f"megalite-eval-results-{stamp}.json",
                 Path(tempfile.gettempdir()) / f"megalite-eval-results-{stamp}.json"]
    for fallback in fallbacks:
        try:
            atomic_write_text(fallback, text)
        except OSError:
            continue
        raise MegaliteError(f"{flag} {path}: could not be written ({failure}); the results were written to "
                            f"{fallback} instead")
    print(text, file=sys.stderr)
    raise MegaliteError(f"{flag} {path}: could not be written ({failure}), nor anywhere else "
                        f"({', '.join(str(f.parent) for f in fallbacks)}); the result JSON is printed above on stderr")
