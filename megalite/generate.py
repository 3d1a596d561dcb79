"""Sampling text from a checkpoint with a KV cache (`megalite generate`), on one process or TP ranks.

Launched as a single process it runs at TP 1; under torchrun / the deepspeed launcher with N
processes it runs at TP N (every rank computes the same gathered logits and rank 0's choice of
token is broadcast, so the ranks cannot drift apart).

Sampling options (checked before the model loads; a bad value is a ConfigError naming it):
temperature >= 0 and finite, 0 meaning greedy (argmax); top_k >= 0, 0 or None meaning no limit;
top_p in [0, 1], the smallest set of most likely tokens whose mass reaches top_p (the most likely
token always stays, so 0 keeps it alone); max_new_tokens >= 0. The prompt and the new tokens must
fit in the model's context (max_position_embeddings): a prompt that leaves no room for a new token is
a DataError; when prompt + max_new_tokens does not fit, generation stops at the context's end with a
warning on stderr. Generation stops early at the end-of-document token of the run's data (the `eos`
of an exported Hugging Face model), which ends the text; `stop_at_eod=False` continues past it.

The sampler itself (`generate_ids`, `sample_next`, ...) is megalite.model.sampling, re-exported here; this
module loads checkpoints for inference (`load_for_inference`, also used by megalite.eval_harness). It imports
nothing of the engine (process start-up is megalite.launch), so the harness and, through it, training can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalite import launch
from megalite.checkpoint.consolidate import model_from_checkpoint, run_tokenizer
from megalite.config import Config
from megalite.errors import DataError
from megalite.model.sampling import (  # noqa: F401 - re-exported: megalite.generate is where users find them
    PYTHON_NAMES,
    check_sampling_options,
    generate_ids,
    sample_next,
    sampling_probabilities,
)
from megalite.parallel.grid import ProcessGrid


@dataclass
class InferenceModel:
    """A checkpoint loaded for inference: its config, the model (eval mode, sharded at this process group's TP
    degree, on this process's device), the run's tokenizer and its end-of-document / beginning-of-sequence ids."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    eod_token_id: int | None
    bos_token_id: int | None
    step_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_for_inference(checkpoint: str | os.PathLike, tokenizer: str | None = None,
                       dtype: torch.dtype | None = None) -> InferenceModel:
    """A checkpoint of any layout, ready to run on this process's device. Launched as one process it runs at
    TP 1; under N processes (torchrun, the deepspeed launcher, srun) it starts the process group and runs at TP N."""
    if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:  # a launcher's process (srun's mapped)
        launch.discover_environment()
    grid = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launch.init_distributed()
        grid = ProcessGrid(tensor=int(os.environ["WORLD_SIZE"]), pipeline=1)
    cfg, model, step_dir = model_from_checkpoint(checkpoint, grid)
    model = model.to(launch.device())
    if dtype is not None:
        model = model.to(dtype)
    tok, eod, bos = run_tokenizer(cfg, step_dir, tokenizer)
    return InferenceModel(cfg, model, tok, eod, bos, step_dir)


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, tokenizer: str | None = None,
                  use_cache: bool = True, stop_at_eod: bool = True) -> str:
    """The prompt and its continuation, sampled from a checkpoint of any layout, ending at the data's
    end-of-document token unless `stop_at_eod` is False. Under a launcher with N processes (WORLD_SIZE > 1) the
    model runs at TP N and every rank returns the same text."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)  # before the (slow) load
    loaded = load_for_inference(checkpoint, tokenizer)
    prompt_ids = torch.tensor([loaded.tokenizer.encode(prompt).ids], dtype=torch.long, device=loaded.device)
    if prompt_ids.shape[1] == 0:
        raise DataError("the prompt encodes to no tokens")
    eos_id = loaded.eod_token_id if stop_at_eod else None
    out = generate_ids(loaded.model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                       use_cache=use_cache, eos_id=eos_id)
    return loaded.tokenizer.decode(out[0].tolist())
