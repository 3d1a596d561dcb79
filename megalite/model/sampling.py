"""Token sampling with a KV cache, on one process or on the ranks of a tensor-parallel group: the core of
`megalite generate` (megalite.generate) and of the lm-evaluation-harness model's generations (also inside a
training run, megalite.eval_harness), so it lives with the model, below both.

Sampling options (a bad value is a ConfigError naming it): temperature >= 0 and finite, 0 meaning greedy
(argmax); top_k >= 0, 0 or None meaning no limit; top_p in [0, 1], the smallest set of most likely tokens
whose mass reaches top_p (the most likely token always stays, so 0 keeps it alone); max_new_tokens >= 0.
The prompt and the new tokens must fit in the model's context (max_position_embeddings): a prompt that leaves
no room for a new token is a DataError; when prompt + max_new_tokens does not fit, generation stops at the
context's end with a warning. Every rank computes the same gathered logits and rank 0's token is broadcast,
so the ranks cannot drift apart.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable

import torch
import torch.distributed as dist

from megalite.errors import ConfigError, DataError

log = logging.getLogger("megalite.generate")  # the name users know from `megalite generate`

# How each option is named to a Python caller; `megalite generate` passes its own option names.
PYTHON_NAMES = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                           names: dict[str, str] | None = None, min_new_tokens: int = 0) -> None:
    """Raise a ConfigError naming every bad option and its value (see the module's docstring for the rules);
    `megalite generate` asks for at least one new token (min_new_tokens=1)."""
    names = names or PYTHON_NAMES
    problems = []
    if not _is_int(max_new_tokens) or max_new_tokens < min_new_tokens:
        problems.append(f"{names['max_new_tokens']} {max_new_tokens!r}: must be an integer >= {min_new_tokens}")
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
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Prompt (B, T) -> prompt followed by up to `max_new_tokens` tokens (B, T + n). Stops early when every row
    has produced `eos_id` (kept in the output), when `stop` (given the (B, n) tokens generated so far after each
    step, the same on every rank) returns True, or at the model's context length with a warning."""
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
        if stop is not None and stop(ids[:, prompt_len:]):
            break
    return ids

