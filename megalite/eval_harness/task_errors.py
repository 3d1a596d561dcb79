"""What went wrong with a task of the harness, said as what it is.

The harness skips a task YAML it cannot parse while it indexes the task folders (so a syntax error surfaced as
"unknown task"), and it raises whatever a task's construction raises (a Jinja error in a template, a misspelt
output_type or metric, a missing `!function` module) from the same call that loads the task's data, which
megalite used to report as a data problem with advice about the offline datasets cache. Here: the YAML files of
an include path that do not parse (file, line, column, the parser's words); and an exception from loading a task
classified by where it was raised (inside `datasets`, the hub or fsspec: the data; anywhere else: the task's
definition), with the task's file and what the harness logged just before (the real cause is often only there:
an unknown metric logs its name, then fails with `KeyError: None`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sysconfig
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megalite.errors import ConfigError, DataError, MegaliteError

# Packages whose exceptions are about a task's data (reading it, finding it, downloading it).
DATA_PACKAGES = ("datasets", "huggingface_hub", "fsspec", "pyarrow", "requests", "urllib3", "aiohttp")
# Loaders that read local files (dataset_path: json with dataset_kwargs.data_files), which no cache can hold.
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "pandas")


def unreadable_yamls(include_path: str) -> list[tuple[Path, str]]:
    """(file, what is wrong) for every task YAML under `include_path` that the harness's loader cannot read (the
    harness's index skips those without a word). A syntax error says its line and column."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = []
    for path in sorted(Path(include_path).glob("**/*.yaml")):
        if any(part in ("__pycache__", ".ipynb_checkpoints") for part in path.parts):
            continue
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # noqa: BLE001 - yaml, include and type errors alike: say them
            out.append((path, _yaml_problem(e)))
    return out


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        context = f" ({error.context})" if getattr(error, "context", None) else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}{context}"
    return f"{type(error).__name__}: {_first_line(error)}"


def defines(path: Path, name: str) -> bool:
    """Whether the (unparseable) file at `path` looks like the definition of task `name`: its stem, or a
    `task: name` line."""
    if path.stem == name:
        return True
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return re.search(rf"^\s*task:\s*['\"]?{re.escape(name)}['\"]?\s*(#.*)?$", text, re.MULTILINE) is not None


def unknown_task_problem(name: str, where: str, include_path: str | None, close: list[str]) -> str:
    """The message for a task name the harness's index does not have: the file that should define it and why it
    does not parse, or the close names (and any files of the include path that could not be read)."""
    broken = unreadable_yamls(include_path) if include_path else []
    mine = [(path, problem) for path, problem in broken if defines(path, name)]
    if mine:
        return "; ".join(f"{where}: task {name!r} is defined in {path}, which cannot be read: {problem}"
                         for path, problem in mine)
    hint = f"; close names: {', '.join(close)}" if close else ""
    message = f"{where}: unknown task {name!r}{hint} (`lm-eval ls tasks` lists them all)"
    if broken:
        shown = "; ".join(f"{path}: {problem}" for path, problem in broken[:3])
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        message += f"; task files in the include path that cannot be read: {shown}{more}"
    return message


@contextlib.contextmanager
def harness_warnings() -> Iterator[list[str]]:
    """The warnings and errors the harness logs meanwhile (their messages, in order)."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                said.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("lm_eval")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def load_error(manager: Any, name: str, error: Exception, said: list[str], data_hint: str) -> MegaliteError:
    """The error to raise for `error`, raised while the harness loaded task `name`: a DataError when it came from
    reading the task's data, a ConfigError naming the task's file otherwise."""
    entry = getattr(manager, "task_index", {}).get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    source = f" ({yaml_path})" if yaml_path else ""
    cause = f"{type(error).__name__}: {_first_line(error)}"
    package, frame = _raised_in(error)
    if package in DATA_PACKAGES:
        config = getattr(entry, "cfg", None) or {}
        if config.get("dataset_path") in LOCAL_BUILDERS:
            hint = "Check the files its dataset_kwargs.data_files names"
        else:
            hint = data_hint
        return DataError(f"task {name!r}{source}: its data could not be loaded ({cause}). {hint}")
    key = _template_key(getattr(entry, "cfg", None) or {}, getattr(error, "source", None))
    line = _key_line(yaml_path, key) if key else None
    at = f" in {key}" + (f" (line {line})" if line else "") if key else ""
    where = f" (raised at {frame})" if frame else ""
    # what the harness logged on the way, less its notices of defaults it applied
    logged = [m.strip().splitlines()[0] for m in said if m.strip() and "using default" not in m]
    logged = list(dict.fromkeys(logged))[-3:]
    also = f"; the harness said before: {' | '.join(logged)}" if logged else ""
    return ConfigError(f"task {name!r}{source}: its definition is invalid{at}: {cause}{where}{also}")


def _template_key(config: dict, source: Any) -> str | None:
    """The key of the task's config whose template is `source` (a Jinja error's template text)."""
    if not isinstance(source, str):
        return None
    return next((k for k, v in config.items() if isinstance(v, str) and v == source), None)


def _key_line(yaml_path: Any, key: str) -> int | None:
    """The line of `key:` in the task's YAML file."""
    try:
        lines = Path(yaml_path).read_text(errors="replace").splitlines()
    except (OSError, TypeError):
        return None
    return next((i + 1 for i, text in enumerate(lines) if re.match(rf"\s*{re.escape(key)}\s*:", text)), None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else repr(error)


def _raised_in(error: BaseException) -> tuple[str, str]:
    """(the top-level package of the innermost frame outside the standard library, 'file:line' of that frame)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        filename = frame.filename
        if filename.startswith("<") or (filename.startswith(stdlib) and "site-packages" not in filename):
            continue  # the standard library and frozen import machinery say nothing about whose error it is
        match = re.search(r"site-packages[/\\]([A-Za-z0-9_]+)", filename)
        package = match.group(1) if match else Path(filename).stem
        short = filename.split("site-packages/")[-1]
        return package, f"{short}:{frame.lineno}"
    return "", ""
