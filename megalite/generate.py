"""Sampling text from a model with a KV cache (`megalite generate`), on one process or TP ranks.

Launched as a single process it runs at TP 1; under torchrun / the deepspeed launcher with N
processes it runs at TP N (every rank computes the same gathered logits and rank 0's choice of
token is broadcast, so the ranks cannot drift apart).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from megalite.checkpoint.consolidate import find_tokenizer, model_from_checkpoint
from megalite.engine.launch import init_distributed
from megalite.errors import DataError
from megalite.parallel.grid import ProcessGrid


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
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
    """Prompt (B, T) -> prompt followed by up to `max_new_tokens` tokens (B, T + n)."""
    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    if prompt_ids.shape[1] + max_new_tokens > limit:
        max_new_tokens = max(0, limit - prompt_ids.shape[1])
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


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, tokenizer: str | None = None,
                  use_cache: bool = True) -> str:
    """The prompt and its continuation, sampled from a checkpoint of any layout. Under a launcher with N
    processes (WORLD_SIZE > 1) the model runs at TP N and every rank returns the same text."""
    grid = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed()
        grid = ProcessGrid(tensor=int(os.environ["WORLD_SIZE"]), pipeline=1)
    cfg, model, step_dir = model_from_checkpoint(checkpoint, grid)
    tok = Tokenizer.from_file(find_tokenizer(step_dir, cfg, tokenizer))
    prompt_ids = torch.tensor([tok.encode(prompt).ids], dtype=torch.long)
    if prompt_ids.shape[1] == 0:
        raise DataError("the prompt encodes to no tokens")
    out = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache=use_cache)
    return tok.decode(out[0].tolist())
