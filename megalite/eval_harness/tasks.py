"""The harness's tasks: looking them up by name (with close names for a typo), loading their data one task at a
time (a task whose data cannot be loaded is named), running them on a harness model, their main metrics, and the
random states a run inside training must leave as they were."""

from __future__ import annotations

import collections
import contextlib
import difflib
import json
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megalite.errors import ConfigError
from megalite.eval_harness.lm import require_lm_eval
from megalite.eval_harness.task_errors import harness_warnings, load_error, unknown_task_problem

DATA_HINT = (
    "Without network the harness reads each task's dataset from the local Hugging Face datasets cache "
    "(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets): run the task once where the network is "
    "reachable (HF_DATASETS_OFFLINE unset) and copy that cache here, or write a task YAML whose dataset_path "
    "is `json` with dataset_kwargs.data_files naming local files, in a folder given with --include-path"
)


def find_tasks(names: list[str], include_path: str | None = None, where: str = "--tasks") -> tuple[Any, list[str]]:
    """(the harness's TaskManager, the task names `names` resolve to). An unknown name is a ConfigError listing the
    harness's close names. The built-in task index (a few seconds to build) is read only when a name is not
    among the user's own tasks in `include_path`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"{'--include-path' if where == '--tasks' else 'train.eval_tasks.include_path'}: "
                          f"{include_path!r} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(_plain_tasks(manager, manager.match_tasks([n])) for n in names):
        manager = TaskManager(include_path=include_path)  # the user's groups and tags may name built-in tasks
    problems, resolved = [], []
    for name in names:
        matches = manager.match_tasks([name])
        if not matches:  # or its YAML does not parse: the harness's index skips such files silently
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            problems.append(unknown_task_problem(name, where, include_path, close))
        resolved += [m for m in matches if m not in resolved]
    if problems:
        raise ConfigError(problems)
    return manager, resolved


def _plain_tasks(manager: Any, names: list[str]) -> bool:
    """Whether `names` are all single tasks (no groups or tags) of the manager's index."""
    from lm_eval.tasks._index import Kind

    return bool(names) and all(manager.task_index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names)


def load_tasks(manager: Any, names: list[str]) -> list[Any]:
    """The harness's Task/Group objects with their data, one name at a time, so that a task that cannot be loaded
    is named: a DataError when its data cannot be read, a ConfigError naming its file when its definition is
    invalid (megalite.eval_harness.task_errors tells them apart)."""
    built = []
    for name in names:
        with harness_warnings() as said:
            try:
                loaded = manager.load(name)
            except Exception as e:  # noqa: BLE001 - datasets/fsspec/hub/Jinja/harness errors of every kind
                raise load_error(manager, name, e, said, DATA_HINT) from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built += [t for t in loaded["tasks"].values() if t not in built]
    return built


def leaf_tasks(built: list[Any]) -> list[Any]:
    """The single tasks of `load_tasks`'s Task and Group objects."""
    out = []
    for item in built:
        for task in item.get_all_tasks() if hasattr(item, "get_all_tasks") else [item]:
            if task not in out:
                out.append(task)
    return out


def fewshot_problems(built: list[Any], num_fewshot: int | None, flag: str = "--num-fewshot") -> list[str]:
    """Why a task cannot have its few-shot examples: more asked for (by `num_fewshot`, or the task's own
    num_fewshot) than its few-shot documents hold. The harness would fail on the first request instead, after the
    model has loaded. Mirrors lm_eval.simple_evaluate (a task whose config says 0 ignores `num_fewshot`) and its
    sampler (drawing from the evaluated split leaves out the document itself)."""
    problems = []
    for task in leaf_tasks(built):
        own = task.get_config("num_fewshot")
        shots = 0 if own == 0 else num_fewshot if num_fewshot is not None else (own or 0)
        if not shots:
            continue
        sampler = getattr(task, "sampler", None)
        docs = list(sampler.fewshot_docs()) if sampler is not None else []
        split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        same = split is not None and split == task.get_config("test_split")
        usable = len(docs)
        if same and docs:  # a document is never its own example, nor are its copies
            copies = collections.Counter(json.dumps(d, sort_keys=True, default=str) for d in docs)
            usable -= max(copies.values())
        if shots > usable:
            where = f"its {split!r} split" if split else "its documents"
            asked = f"{flag} {shots}" if num_fewshot is not None else f"its own num_fewshot {shots}"
            problems.append(f"{asked}: task {task.get_config('task')!r} has {usable} few-shot example(s) in {where}"
                            f"{' (a document and its copies are not examples for it)' if same else ''}; use at "
                            f"most {usable}")
    return problems


def run_tasks(lm: Any, manager: Any, names: list[str], num_fewshot: int | None = None,
              limit: int | float | None = None, log_samples: bool = False, tasks: list[Any] | None = None,
              **harness_options: Any) -> dict:
    """The harness's evaluation of `names` on `lm` (rank 0), with its usual seeds; its result dict. `tasks`: the
    tasks already loaded (`load_tasks`), so that they are not loaded twice."""
    from lm_eval import simple_evaluate

    tasks = load_tasks(manager, names) if tasks is None else tasks
    problems = fewshot_problems(tasks, num_fewshot)
    if problems:
        raise ConfigError(problems)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               log_samples=log_samples, batch_size=lm.batch_size, **harness_options)


def main_metrics(results: dict, names: list[str]) -> dict[str, float]:
    """Each task's main metric (the first the task reports), as {"task/metric": value}."""
    scores = {}
    for name in names:
        for key, value in results.get("results", {}).get(name, {}).items():
            # Metric entries are "metric,filter"; the others (alias, sample_len, ...) describe the task.
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            label = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            scores[f"{name}/{label}"] = float(value)
            break
    return scores


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """The harness seeds Python, numpy and torch; a training run's own random streams must not notice."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])
