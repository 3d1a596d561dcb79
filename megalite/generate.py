"""Sampling text from a model with a KV cache (`megalite generate`), on one process or TP ranks.

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
"""

from __future__ import annotations

import logging
import math
import numbers
import os

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from megalite.checkpoint.consolidate import find_tokenizer, model_from_checkpoint
from megalite.config import Config
from megalite.data.prepare import read_manifest
from megalite.engine.launch import init_distributed
from megalite.errors import ConfigError, DataError
from megalite.parallel.grid import ProcessGrid

log = logging.getLogger("megalite.generate")

# How each option is named to a Python caller; `megalite generate` passes its own option names.
PYTHON_NAMES = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                           names: dict[str, str] | None = None) -> None:
    """Raise a ConfigError naming every bad option and its value (see the module's docstring for the rules)."""
    names = names or PYTHON_NAMES
    problems = []
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        problems.append(f"{names['max_new_tokens']} {max_new_tokens!r}: must be an integer >= 0")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        problems.append(f"{names['temperature']} {temperature!r}: must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        problems.append(f"{names['top_k']} {top_k!r}: must be an integer >= 0 (0 means no limit)")
    if top_p is not None and (not _is_real(top_p) or not 0.0 <= top_p <= 1.0):  # NaN fails the comparison
        problems.append(f"{names['top_p']} {top_p!r}: must be a number in [0, 1] (1 means no limit)")
    if problems:
        raise ConfigError(problems)


def sampling_probabilities(logits: torch.Tensor, temperature: float, top_k: int | None,
                           top_p: float | None) -> torch.Tensor:
    """The distribution (B, V) that `sample_next` draws from at temperature > 0: softmax(logits / temperature)
    restricted to the top_k most likely tokens (ties with the k-th stay), then to the smallest set of the most
    likely of those whose mass reaches top_p, renormalised."""
    logits = logits.float()
    # Subtracting the maximum first keeps a tiny temperature from overflowing to inf (inf - inf is NaN).
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else a draw from
    `sampling_probabilities`."""
    check_sampling_options(0, temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Prompt (B, T) -> prompt followed by up to `max_new_tokens` tokens (B, T + n). Stops early when every row
    has produced `eos_id` (kept in the output), or at the model's context length with a warning."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    limit = model.config.max_position_embeddings
    prompt_len = prompt_ids.shape[1]
    if prompt_len > limit or (prompt_len == limit and max_new_tokens > 0):
        raise DataError(f"the prompt is {prompt_len} tokens and the model's context (max_position_embeddings) is "
                        f"{limit}, which leaves no room for a new token; shorten the prompt to at most {limit - 1} "
                        "tokens")
    if prompt_len + max_new_tokens > limit:
        log.warning("generating at most %d new tokens, not %d: the prompt's %d tokens and the new ones must fit in "
                    "the model's context of %d (max_position_embeddings)", limit - prompt_len, max_new_tokens,
                    prompt_len, limit)
        max_new_tokens = limit - prompt_len
    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    ids = prompt_ids
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + max_new_tokens) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else ids, kv_cache=cache, gather_logits=True)[:, -1, :]
        logits = logits[:, : model.config.vocab_size]  # padded entries are never predicted
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(nxt, src=0)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    return ids


def end_of_document_id(cfg: Config) -> int | None:
    """The end-of-document token of the run's data (from the first prefix manifest that names one), or None."""
    for prefix in cfg.data.prefixes:
        eod = (read_manifest(prefix) or {}).get("eod_token_id")
        if eod is not None:
            return int(eod)
    return None


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, tokenizer: str | None = None,
                  use_cache: bool = True, stop_at_eod: bool = True) -> str:
    """The prompt and its continuation, sampled from a checkpoint of any layout, ending at the data's
    end-of-document token unless `stop_at_eod` is False. Under a launcher with N processes (WORLD_SIZE > 1) the
    model runs at TP N and every rank returns the same text."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)  # before the (slow) load
    grid = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed()
        grid = ProcessGrid(tensor=int(os.environ["WORLD_SIZE"]), pipeline=1)
    cfg, model, step_dir = model_from_checkpoint(checkpoint, grid)
    tok = Tokenizer.from_file(find_tokenizer(step_dir, cfg, tokenizer))
    prompt_ids = torch.tensor([tok.encode(prompt).ids], dtype=torch.long)
    if prompt_ids.shape[1] == 0:
        raise DataError("the prompt encodes to no tokens")
    eos_id = end_of_document_id(cfg) if stop_at_eod else None
    out = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache=use_cache,
                       eos_id=eos_id)
    return tok.decode(out[0].tolist())
