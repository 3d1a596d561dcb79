"""Initialisation of tensor-parallel weights, and whole-model state dicts gathered from or loaded into shards.

How a parameter is sharded is `megalite.parallel.sharding`'s; how it is initialised is its attribute
`megalite_init`: ("normal", std), ("zeros",) or ("ones",).

Initialisation draws the FULL tensor from generators named after the parameter, the seed and the chunk
(`INIT_CHUNK_ELEMENTS` elements each, drawn by parallel threads), then keeps this rank's shard: the same
seed gives the same model whatever the TP degree or thread count.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from megalite.parallel.layers import VocabParallelEmbedding, set_init, set_tensor_parallel_attributes  # noqa: F401
from megalite.parallel.mappings import Group, group_rank, group_size
from megalite.parallel.sharding import full_shape, gather_experts, gather_tensor, shard_tensor


def _generator(seed: int, name: str) -> torch.Generator:
    # A stream per parameter name: adding, removing or resharding parameters never shifts another's values.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


# Elements per random stream. A tensor's values depend on (seed, name, chunk index) only, so the chunks can be
# drawn by several threads (a CPU generator is serial: ~130M normals/s, a minute for an 8B model) with the same
# result; a tensor of one chunk uses the stream named after the parameter alone.
INIT_CHUNK_ELEMENTS = 1 << 22


def init_threads() -> int:
    """CPU threads for drawing initial values: this machine's cores shared among the node's ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")) or 1)
    return max(1, min(32, cores // max(1, local_ranks)))


def init_full(
    name: str, shape: tuple[int, ...], kind: tuple[str, float], seed: int, threads: Optional[int] = None
) -> torch.Tensor:
    """The full fp32 initial value of parameter `name` (on CPU, so it is the same on every device)."""
    if kind[0] == "zeros":
        return torch.zeros(shape)
    if kind[0] == "ones":
        return torch.ones(shape)
    if kind[0] != "normal":
        raise ValueError(f"unknown init {kind!r} for {name}")
    out = torch.empty(shape)
    flat = out.view(-1)

    def fill(index: int) -> None:
        stream = name if index == 0 else f"{name}#{index}"
        start = index * INIT_CHUNK_ELEMENTS
        flat[start : start + INIT_CHUNK_ELEMENTS].normal_(0.0, kind[1], generator=_generator(seed, stream))

    chunks = range(-(-flat.numel() // INIT_CHUNK_ELEMENTS))
    workers = min(len(chunks), threads or init_threads())
    if workers <= 1:
        for i in chunks:
            fill(i)
    else:  # normal_ releases the GIL: the threads draw in parallel
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, chunks))
    return out


@torch.no_grad()
def initialize_parameters(
    module: torch.nn.Module, seed: int, group: Group = None, name_map: Optional[Callable[[str], str]] = None
) -> None:
    """Initialise every parameter of `module` from its full tensor, keeping this TP rank's shard.

    `name_map` turns the module's parameter names into the canonical ones that name the random streams
    (a pipeline stage's layer draws exactly what the same layer of the whole model draws).
    """
    rank, size = group_rank(group), group_size(group)
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        kind = getattr(p, "megalite_init", ("normal", 0.02))
        full = init_full(name_map(name) if name_map else name, full_shape(p, size), kind, seed)
        p.copy_(shard_tensor(full, p, rank, size).to(dtype=p.dtype, device=p.device))


def full_state_dict(module: torch.nn.Module, group: Group = None) -> dict[str, torch.Tensor]:
    """Gathered (unsharded) parameters by name, on every TP rank (a collective over `group`, and over the
    expert-parallel group of expert weights split over one)."""
    return {name: gather_experts(gather_tensor(p, p, group), p) for name, p in module.named_parameters()}


def full_grads(module: torch.nn.Module, group: Group = None) -> dict[str, Optional[torch.Tensor]]:
    """Gathered (unsharded) gradients by name (None where a parameter has none)."""
    # Whether a gradient exists is the same on every TP (and expert-parallel) rank, so the collectives stay matched.
    return {n: gather_experts(gather_tensor(p.grad, p, group), p) if p.grad is not None else None
            for n, p in module.named_parameters()}


@torch.no_grad()
def load_full_tensors(
    params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor], group: Group = None
) -> None:
    """Copy the full tensor `state[name]` into this rank's shard of `params[name]`, for every name of `params`.

    One tensor is looked up at a time, so a lazily read `state` (a Hugging Face import) never holds the
    whole model in memory.
    """
    rank, size = group_rank(group), group_size(group)
    for name, p in params.items():
        full = state[name]
        want = full_shape(p, size)
        if tuple(full.shape) != want:
            raise ValueError(f"{name}: expected full shape {want}, got {tuple(full.shape)}")
        p.copy_(shard_tensor(full, p, rank, size).to(dtype=p.dtype, device=p.device))
        del full


def model_buffers(module: torch.nn.Module, name_map: Optional[Callable[[str], str]] = None) -> dict[str, torch.Tensor]:
    """The buffers a state dict keeps (persistent ones: the routers' expert bias), by name (`name_map`: the whole
    model's name of a pipeline layer's). They are the same on every rank: nothing to gather or shard."""
    transient = {f"{prefix}.{n}" if prefix else n for prefix, m in module.named_modules()
                 for n in m._non_persistent_buffers_set}
    return {(name_map(n) if name_map else n): b for n, b in module.named_buffers() if n not in transient}


@torch.no_grad()
def load_buffers(buffers: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state[name]` into every buffer of `buffers` that `state` holds."""
    for name, b in buffers.items():
        if name in state:
            value = state[name]
            if tuple(value.shape) != tuple(b.shape):
                raise ValueError(f"{name}: expected shape {tuple(b.shape)}, got {tuple(value.shape)}")
            b.copy_(value.to(dtype=b.dtype, device=b.device))


def load_full_state_dict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], group: Group = None, strict: bool = True
) -> list[str]:
    """Copy full tensors into this rank's shards, and the buffers a state dict keeps (the routers' expert bias);
    returns the names of parameters and buffers not in `state`."""
    params = dict(module.named_parameters())
    buffers = model_buffers(module)
    missing = [name for name in [*params, *buffers] if name not in state]
    if strict:
        unexpected = sorted(set(state) - set(params) - set(buffers))
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    load_full_tensors({n: p for n, p in params.items() if n in state}, state, group)
    load_buffers(buffers, state)
    return missing


def parameter_names(module: torch.nn.Module) -> Iterable[str]:
    """Names of the module's parameters (the canonical checkpoint keys)."""
    return (n for n, _ in module.named_parameters())


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; norms, biases and embedding tables do not.

    Embeddings are found by module type, not by name: a PipelineModule names its layers by index.
    """
    embedding_types = (torch.nn.Embedding, VocabParallelEmbedding)
    tables = {id(p) for m in model.modules() if isinstance(m, embedding_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in tables else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
