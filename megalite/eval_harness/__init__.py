"""EleutherAI's lm-evaluation-harness on megalite models: on a model in memory (a training run's
`train.eval_tasks`) and on checkpoints of any layout (`megalite eval --tasks`, `python -m megalite.eval_harness`,
and `lm_eval --model megalite` through the `lm_eval.models` entry point `megalite.eval_harness:MegaliteLM`).

    calls        `ModelCalls`: the model computations behind the harness's requests, in lockstep on every rank
    lm           `HarnessLMBase`: the harness's `LM` interface over a model in memory; `live_model_class()`
    tasks        task lookup (close names for a typo), loading, running, main metrics; `preserved_rng`
    checkpoints  `MegaliteLM` over a checkpoint, registered as "megalite"; `evaluate_checkpoint_tasks`
    cli          `harness_cli`, the harness's own command line (`__main__` runs it)

Layering: this package sits below megalite.engine and above megalite.generate. Training's `TaskEvaluator`
(engine/evaluation.py) runs `lm` and `tasks` on the live model; the checkpoint model loads through generate's
`load_for_inference`, which needs only checkpoint, model, parallel and megalite.launch. So no module here
imports the engine, and the engine can use the harness without an import cycle. (That holds because launch, rank
discovery and process-group start-up from a launcher's environment, imports nothing of megalite's and serves
training, inference and benchmarks alike: it is a base module beside megalite.distributed, not part of the
engine.)

lm_eval is imported inside functions only: it is a heavy optional dependency (the `eval` extra), and
`import megalite`, `megalite --help` and a training run without `train.eval_tasks` must work without it.
`MegaliteLM` is built on first access (PEP 562 `__getattr__` below), so importing this package needs no lm_eval.
"""

from __future__ import annotations

from typing import Any

from megalite.eval_harness.calls import ModelCalls
from megalite.eval_harness.checkpoints import (
    MODEL_NAME,
    FollowerDone,
    MegaliteLMBase,
    evaluate_checkpoint_tasks,
    model_class,
    result_document,
)
from megalite.eval_harness.cli import harness_cli
from megalite.eval_harness.lm import INSTALL_HINT, HarnessLMBase, live_model_class, require_lm_eval
from megalite.eval_harness.tasks import DATA_HINT, find_tasks, load_tasks, main_metrics, preserved_rng, run_tasks

__all__ = [
    "DATA_HINT", "INSTALL_HINT", "MODEL_NAME", "FollowerDone", "HarnessLMBase", "MegaliteLM", "MegaliteLMBase",
    "ModelCalls", "evaluate_checkpoint_tasks", "find_tasks", "harness_cli", "live_model_class", "load_tasks",
    "main_metrics", "model_class", "preserved_rng", "require_lm_eval", "result_document", "run_tasks",
]


def __getattr__(name: str) -> Any:
    # `megalite.eval_harness:MegaliteLM` (the entry point) and `from megalite.eval_harness import MegaliteLM` build
    # the class on first use (it derives from lm_eval's TemplateLM).
    if name == "MegaliteLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
