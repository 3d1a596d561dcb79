"""`megalite generate`: sample text from a checkpoint with a KV cache, on one process or TP ranks.

Launched as a single process it runs at TP 1; under torchrun / the deepspeed launcher with N
processes it runs at TP N (every rank computes the same gathered logits and rank 0's choice of
token is broadcast, so the ranks cannot drift apart).
"""

from __future__ import annotations

import argparse
import sys

import torch


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
    import torch.distributed as dist

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite generate`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory, root, or run directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checks)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """Load, generate, print the text (rank 0)."""
    import os

    from tokenizers import Tokenizer

    from megalite.engine.consolidate import find_tokenizer, model_from_checkpoint

    grid = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megalite.engine.launch import init_distributed
        from megalite.parallel import ProcessGrid

        init_distributed()
        grid = ProcessGrid(tensor=int(os.environ["WORLD_SIZE"]), pipeline=1)
    cfg, model, step_dir = model_from_checkpoint(args.checkpoint, grid)
    tokenizer = Tokenizer.from_file(find_tokenizer(step_dir, cfg, args.tokenizer))
    prompt = torch.tensor([tokenizer.encode(args.prompt).ids], dtype=torch.long)
    if prompt.shape[1] == 0:
        print("megalite generate: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    out = generate_ids(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       use_cache=not args.no_cache)
    if int(os.environ.get("RANK", "0")) == 0:
        print(tokenizer.decode(out[0].tolist()))
    return 0
