"""Loading a run file: JSON, shipped presets and DeepSpeed files by name, `--set` overrides, then typed
conversion and validation (every problem raised together as one ConfigError).

`model` is inline, a preset name from `configs/models/`, a path, or `{"preset": NAME, ...overrides}`.
`deepspeed` is inline or the name of a DeepSpeed JSON (relative paths resolve against the run file, then
the working directory, then the shipped `configs/deepspeed/`). The presets ship inside the package
(`megalite/configs/`), so an installed megalite finds them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from megalite.config.convert import build, suggest
from megalite.config.schema import Config, ModelConfig
from megalite.config.unique_json import DuplicateKeyError, loads_unique
from megalite.config.validate import validate
from megalite.errors import ConfigError, shown

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

def read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {e}") from None
    try:
        return loads_unique(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{what}: {path}: {e}: JSON would keep only the second, silently; keep one") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise ConfigError(f"{what}: {path} is not valid JSON: {e}") from None


def _resolve_file(ref: str, base: Path | None, subdir: str) -> Path:
    """A config reference: a path (absolute or relative to the run file), or a name in configs/<subdir>."""
    candidates = []
    p = Path(ref)
    if p.is_absolute():
        return p
    if base is not None:
        candidates.append(base / p)
    candidates.append(Path.cwd() / p)
    name = ref if ref.endswith(".json") else ref + ".json"
    candidates.append(CONFIGS_DIR / subdir / name)
    candidates.append(CONFIGS_DIR / subdir / Path(name).name)
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def list_presets(subdir: str) -> list[str]:
    """Names of the JSON files shipped under configs/<subdir>."""
    return sorted(p.stem for p in (CONFIGS_DIR / subdir).glob("*.json"))


def _shipped_hint(ref: str, subdir: str) -> str:
    """For a config reference that names no file: the closest shipped name, if one is close, and all of them."""
    shipped = list_presets(subdir)
    return f"{suggest(Path(ref).stem, shipped)}; shipped: {', '.join(shipped)}"


def expand_references(raw: dict, base: Path | None) -> dict:
    """Replace a model preset and a DeepSpeed file reference by their contents."""
    raw = copy.deepcopy(raw)
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        ref = model.pop("preset")
        if not isinstance(ref, str):
            raise ConfigError(f"model.preset: expected a preset name or path, got {shown(ref)}")
        path = _resolve_file(ref, base, "models")
        if not path.is_file():
            raise ConfigError(f"model.preset: no preset {shown(ref)} (looked for {shown(str(path), quote=False)})"
                              f"{_shipped_hint(ref, 'models')}")
        preset = read_json(path, "model.preset")
        if not isinstance(preset, dict):
            raise ConfigError(f"model.preset: {path} must hold a JSON object")
        preset.update(model)
        model = preset
    if model is not None:
        raw["model"] = model
    ds = raw.get("deepspeed")
    if isinstance(ds, str):
        path = _resolve_file(ds, base, "deepspeed")
        if not path.is_file():
            raise ConfigError(f"deepspeed: DeepSpeed config file not found: {shown(ds)} (looked for "
                              f"{shown(str(path), quote=False)}){_shipped_hint(ds, 'deepspeed')}")
        raw["deepspeed"] = read_json(path, "deepspeed")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (['a','b','c'], VALUE); VALUE is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {shown(text)}: expected KEY=VALUE, e.g. train.steps=100")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {shown(text)}: empty key segment in {shown(key)}")
    try:
        parsed = loads_unique(value)
    except DuplicateKeyError as e:
        raise ConfigError(f"--set {shown(text)}: {e}: JSON would keep only the second, silently; keep one") from None
    except ValueError:  # not JSON (json.JSONDecodeError is a ValueError): the text itself
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw (reference-expanded) config dict. `--set model=NAME` and
    `--set deepspeed=NAME` name a preset or DeepSpeed file as the run file does (a relative path from the working
    directory), and later overrides change its fields."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        if parts in (["model"], ["deepspeed"]):
            raw = expand_references({**raw, parts[0]: value}, None)
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {shown(text)}: {shown('.'.join(parts[: i + 1]), quote=False)} is {shown(child)}, "
                                  "not an object")
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: Any, world_size: int | None = None, source: str | None = None) -> Config:
    """Build and validate a Config from a dict whose references are already expanded."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'config'}: the top level must be a JSON object, got {type(raw).__name__}")
    errors: list[str] = []
    cfg = build(Config, raw, "config", errors)
    if errors:
        raise ConfigError([f"{source}: {e}" if source else e for e in errors])
    cfg.source = source if source is not None else cfg.source
    validate(cfg, world_size)
    return cfg


def model_config_from_dict(raw: Any, source: str = "model") -> ModelConfig:
    """A ModelConfig alone (a saved model's config.json), with the same type checks as a run's `model`."""
    errors: list[str] = []
    cfg = build(ModelConfig, raw, source, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load(path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Load a run config file, apply `--set` overrides, validate. Raises ConfigError."""
    path = Path(path)
    raw = read_json(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    raw = expand_references(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    raw.pop("source", None)
    return from_dict(raw, world_size=world_size, source=str(path))


