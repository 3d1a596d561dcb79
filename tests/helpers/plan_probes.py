"""Measurements the cost-model tests (tests/test_plan.py) compare `megalite plan` with, run inside ranks.

(`megalite.memory.saved_activation_bytes` counts the bytes autograd saves for backward in one forward.)
- `held_bytes`: every tensor storage reachable from a DeepSpeed engine (module, optimizer, buffers).
- `CollectiveCounter`: wraps the torch.distributed functions megalite and DeepSpeed call and sums the payload
  per process group and collective kind.
- `second_step_holdings`: both, around a real training step of a megalite Trainer.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def held_bytes(root: Any) -> dict[int, int]:
    """storage pointer -> bytes of every tensor reachable from `root` through attributes, containers,
    `.grad` and ZeRO-3's `ds_tensor` (objects of deepspeed, torch.optim, torch.nn and megalite)."""
    seen: set[int] = set()
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr():
                out[storage.data_ptr()] = storage.nbytes()
            for extra in (obj.grad, getattr(obj, "ds_tensor", None)):
                if extra is not None:
                    stack.append(extra)
            continue
        if isinstance(obj, (str, bytes, int, float, bool, type(None), type, types.FunctionType, types.ModuleType)):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module) or (type(obj).__module__ or "").startswith(
                ("deepspeed", "torch.optim", "megalite")):
            stack.extend(getattr(obj, "__dict__", {}).values())
    return out


_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
            "reduce_scatter_tensor", "_reduce_scatter_base", "reduce", "broadcast", "send", "recv", "isend", "irecv",
            "all_to_all_single")


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    def nbytes(t: Any) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        return sum(nbytes(x) for x in t)

    first = args[0] if args else next(iter(kwargs.values()))
    if name == "all_gather":  # (tensor_list, tensor): the gathered size
        return nbytes(args[0] if args else kwargs["tensor_list"])
    if name == "reduce_scatter":  # (output, input_list): the input size
        return nbytes(args[1] if len(args) > 1 else kwargs["input_list"])
    if name in ("all_gather_into_tensor", "_all_gather_base"):  # (output, input)
        return nbytes(args[0] if args else kwargs["output_tensor"])
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single"):  # (output, input): the input
        return nbytes(args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor")))
    return nbytes(first)


KINDS = {"all_reduce": "all-reduce", "all_gather": "all-gather", "all_gather_into_tensor": "all-gather",
         "_all_gather_base": "all-gather", "reduce_scatter": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter",
         "_reduce_scatter_base": "reduce-scatter", "reduce": "reduce-scatter", "broadcast": "broadcast",
         "send": "send/recv", "recv": "send/recv", "isend": "send/recv", "irecv": "send/recv",
         "all_to_all_single": "all-to-all"}


class CollectiveCounter:
    """Within the block, every collective call on this rank: (kind, ranks of its group, payload bytes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # a collective implemented with another (send through isend): count the outer one
                return fn(*args, **kwargs)
            group = kwargs.get("group")
            if group is None and name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor",
                                          "reduce_scatter", "all_gather", "_all_gather_base",
                                          "_reduce_scatter_base") and len(args) > 2 and not isinstance(args[2], bool):
                group = args[2]
            if name in ("send", "recv", "isend", "irecv"):
                ranks: tuple[int, ...] = ()  # point-to-point: no group
            else:
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else \
                    tuple(range(dist.get_world_size()))
            self.calls.append((KINDS[name], ranks, _payload(name, args, kwargs)))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed.distributed_c10d as c10d

        originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}
        wrapped = {name: self._wrap(name, fn) for name, fn in originals.items()}
        for module in (dist, c10d):
            for name, fn in wrapped.items():
                if hasattr(module, name):
                    self._saved.append((module, name, getattr(module, name)))
                    setattr(module, name, fn)
        try:  # DeepSpeed keeps its own references to two of them
            import deepspeed.comm.comm as ds_comm

            cdb = ds_comm.cdb
            for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                               ("reduce_scatter_function", "reduce_scatter_tensor")):
                if cdb is not None and hasattr(cdb, attr):
                    self._saved.append((cdb, attr, getattr(cdb, attr)))
                    setattr(cdb, attr, wrapped[name])
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name, fn in reversed(self._saved):
            setattr(obj, name, fn)
        self._saved.clear()


def second_step_holdings(run: Any) -> tuple[int, list]:
    """Train `run` (a megalite Trainer) two steps, the first creating the optimizer states; return the most bytes
    reachable from its engine during the second (at the end of its backward, before the gradient reduction, and
    inside the optimizer's step) and the collectives of that step (`CollectiveCounter.calls`). The pipeline engine
    dispatches its own bound methods: there only the step is seen."""
    from megalite.engine import signals
    from megalite.engine.metrics import StepTimer

    run.preemption = signals.PreemptionFlag([])
    run.train_step(StepTimer(False))
    engine, snapshots = run.engine, []
    basic = run.schedule.optimizer
    step = basic.step

    def stepped(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        snapshots.append(sum(held_bytes(engine).values()))
        return result

    basic.step = stepped
    if not hasattr(engine, "_exec_reduce_grads"):
        reduce = engine.allreduce_gradients

        def before_reduction(*args: Any, **kwargs: Any) -> Any:
            snapshots.append(sum(held_bytes(engine).values()))
            return reduce(*args, **kwargs)

        engine.allreduce_gradients = before_reduction
    with CollectiveCounter() as counter:
        run.train_step(StepTimer(False))
    return max(snapshots), counter.calls


class _ShardSavingColumnLinear(torch.autograd.Function):
    """Megatron-LM's column-parallel linear under sequence parallelism: the forward gathers the sequence-parallel
    input, multiplies and keeps only its shard; the backward gathers the input again for the weight gradient and
    reduce-scatters the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        from megalite.parallel.mappings import _gather

        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        full = _gather(x, 1, group)
        return torch.nn.functional.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        from megalite.parallel.mappings import _gather, _reduce_scatter

        x, weight = ctx.saved_tensors
        full = _gather(x, 1, ctx.group)
        grad_input = _reduce_scatter(grad @ weight, 1, ctx.group)
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ full.reshape(-1, full.shape[-1])
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


class shard_saving_sequence_parallel:
    """Within the block, megalite's column-parallel layers with sequence parallelism keep their input's shard and
    gather it again in the backward, as Megatron-LM's do (the plan's `sp_saved_input="shard"`, its lower bound)."""

    def __enter__(self) -> shard_saving_sequence_parallel:
        from megalite.parallel import layers

        self._original = layers.ColumnParallelLinear.forward

        def forward(module: Any, x: torch.Tensor, _original: Callable = self._original) -> torch.Tensor:
            if not module.sequence_parallel or module.fp8 is not None or module.gather_output:
                return _original(module, x)
            return _ShardSavingColumnLinear.apply(x, module.weight, module.bias, module.group)

        layers.ColumnParallelLinear.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        from megalite.parallel import layers

        layers.ColumnParallelLinear.forward = self._original
