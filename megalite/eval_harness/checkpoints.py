"""The harness's model over megalite checkpoints: `MegaliteLM`, registered in the harness as "megalite", and the
evaluation of a checkpoint behind `megalite eval --tasks` (`evaluate_checkpoint_tasks`, with its result document).

`MegaliteLM` is `HarnessLMBase` (megalite.eval_harness.lm) plus loading a checkpoint of any layout through
megalite.generate's `load_for_inference`: under N processes the model runs at tensor-parallel N; rank 0 drives the
harness, the other ranks serve its model calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megalite.checkpoint.manifest import read_manifest
from megalite.dtypes import torch_dtype
from megalite.errors import ConfigError, MegaliteError
from megalite.eval_harness.calls import ModelCalls
from megalite.eval_harness.lm import HarnessLMBase, require_lm_eval
from megalite.eval_harness.tasks import fewshot_problems, find_tasks, load_tasks, main_metrics, run_tasks
from megalite.generate import load_for_inference

MODEL_NAME = "megalite"  # the name under which the harness finds the model (`--model megalite`)

# Rank 0's models built by the harness itself (its own command line under N processes), released by harness_cli.
HARNESS_DRIVERS: list[ModelCalls] = []


class FollowerDone(SystemExit):
    """Raised on ranks > 0 when the harness built the model itself (`--model megalite` under N processes): those
    ranks have served rank 0's model calls to the end and must not run the harness a second time."""


class MegaliteLMBase(HarnessLMBase):
    """The methods of `MegaliteLM`; `model_class()` combines them with the harness's `TemplateLM`.

    Built by the harness (`--model megalite --model_args checkpoint=DIR[,tokenizer=F,dtype=bfloat16,
    max_length=N,seed=S]`), directly, or over a model already loaded with `for_model`. `checkpoint` is a step
    directory, a checkpoint root or a run directory of any layout.
    """

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str | None = None,
                 max_length: int | str | None = None, seed: int | str = 1234, **unused: Any) -> None:
        super().__init__()  # the harness's LM state (TemplateLM's __init__)
        if unused:
            raise ConfigError(f"--model_args: unknown argument(s) {sorted(unused)} for the megalite model; known: "
                              "checkpoint, tokenizer, dtype, max_length, seed")
        if checkpoint is None:
            raise ConfigError("--model_args: the megalite model needs checkpoint=DIR")
        loaded = load_for_inference(checkpoint, tokenizer, _dtype(dtype))
        self._setup(loaded.model, loaded.tokenizer, loaded.eod_token_id, loaded.bos_token_id, batch_size,
                    max_length, seed)
        self.step_dir = loaded.step_dir
        if not self.calls.is_driver:
            # Built by the harness on every rank (its own command line under torchrun): the other ranks serve rank 0
            # and end here instead of running the harness again.
            ok = self.calls.serve()
            raise FollowerDone(0 if ok else 1)
        if self.calls.world > 1:
            import atexit

            HARNESS_DRIVERS.append(self.calls)
            atexit.register(self.calls.close)  # a bare `lm_eval` run has no other place to release the other ranks


def _dtype(name: str | None) -> torch.dtype | None:
    """The harness's `dtype=` model argument: None/"auto" keeps the checkpoint's weights as they load."""
    return None if name in (None, "", "auto") else torch_dtype(name, "dtype")


_MODEL_CLASS: type | None = None


def model_class() -> type:
    """`MegaliteLM`: `MegaliteLMBase` on the harness's `TemplateLM`, registered as "megalite" (imports lm_eval)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        require_lm_eval()
        import lm_eval.models  # noqa: F401 - the built-in backends first: the harness loads them only into an empty registry
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model

        # Its public home is the package (`megalite.eval_harness.MegaliteLM`, the entry point), where pickle finds it.
        cls = type("MegaliteLM", (MegaliteLMBase, TemplateLM),
                   {"__module__": "megalite.eval_harness", "__doc__": MegaliteLMBase.__doc__})
        register_model(MODEL_NAME)(cls)
        _MODEL_CLASS = cls
    return _MODEL_CLASS


# ----------------------------------------------------------------------------- `megalite eval --tasks`


def result_document(results: dict, step_dir: Path | None, names: list[str], lm: Any, limit: Any,
                    num_fewshot: int | None) -> dict:
    """The JSON result: the harness's scores with what they were measured on."""
    import lm_eval

    manifest = read_manifest(step_dir) if step_dir is not None else {}
    return {
        "checkpoint": str(step_dir) if step_dir else None,
        "step": manifest.get("step"),
        "manifest_body_sha256": manifest.get("body_sha256"),
        "harness": {"name": "lm-eval", "version": lm_eval.__version__},
        "tasks": names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": lm.batch_size,
        "tensor_parallel": lm.calls.world,
        "results": results.get("results", {}),
        "groups": results.get("groups", {}),
        "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}),
        "n-samples": results.get("n-samples", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "main_metrics": main_metrics(results, names),
        **({"samples": results["samples"]} if "samples" in results else {}),
    }


def evaluate_checkpoint_tasks(checkpoint: str | os.PathLike, tasks: list[str], include_path: str | None = None,
                              num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                              tokenizer: str | None = None, dtype: str | None = None, seed: int = 1234,
                              log_samples: bool = False) -> tuple[dict, dict] | None:
    """The harness's `tasks` on a checkpoint of any layout, at TP N under N processes: on rank 0 (the harness's
    results, the result document), None on the other ranks (they serve rank 0's model calls meanwhile).

    The tasks are looked up, loaded and checked (few-shot examples enough for `num_fewshot`) on every rank before
    the model loads, so that bad input fails at once, the same way on every rank."""
    require_lm_eval()
    manager, resolved = find_tasks(tasks, include_path)
    built = load_tasks(manager, resolved)
    problems = fewshot_problems(built, num_fewshot)
    if problems:
        raise ConfigError(problems)
    loaded = load_for_inference(checkpoint, tokenizer, _dtype(dtype))
    lm = model_class().for_model(loaded.model, loaded.tokenizer, loaded.eod_token_id, loaded.bos_token_id,
                                 batch_size=batch_size, seed=seed, step_dir=loaded.step_dir)
    if not lm.calls.is_driver:
        if not lm.calls.serve():
            raise MegaliteError("the evaluation failed on rank 0 (its error is reported there)")
        return None
    ok = False
    try:
        results = run_tasks(lm, manager, resolved, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                            tasks=built)
        ok = True
    finally:
        lm.calls.close(ok)
    return results, result_document(results, loaded.step_dir, resolved, lm, limit, num_fewshot)
