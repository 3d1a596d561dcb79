"""Weight gradients computed later than input gradients, for zero-bubble pipeline schedules.

A zero-bubble schedule (ZB-H1, megalite.engine.pipeline_schedules) splits a stage's backward pass in two: B, the
input gradients the previous stage waits for, and W, the weight gradients nobody waits for, run later in what
would otherwise be idle time. The tensor-parallel linears (`linear` below, and the FP8 linear in
`megalite.parallel.fp8`) ask `STORE` in their backward whether a pass is collecting: if so they return no weight
gradient and queue a closure that computes it from what the backward had at hand (the saved input and the output
gradient: for a column-parallel layer with sequence parallelism the sequence-gathered input the forward saved, so
the W pass needs no collective). Every other parameter (norms, embeddings, biases, routers, experts) keeps its
gradient in the B pass.

    with STORE.deferring(key):      # the B pass of micro-batch `key`
        outputs.backward(grads)
    ...
    for param, grad in STORE.pop(key):  # the W pass: [(parameter, dW)], in the order the B pass queued them
        ...

Outside `deferring` (every dense run, 1F1B, evaluation) the linears compute dW in their backward as usual. The
closures keep the saved tensors alive until the W pass: that is the memory ZB-H1 trades for its bubble. Gradient
accumulation needs nothing of its own: megalite's linears have no fused accumulation into a separate main gradient
(Megatron's `gradient_accumulation_fusion`), and the W passes add into `.grad` in micro-batch order, as the
backward passes would have.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Optional

import torch
import torch.nn.functional as F


class WeightGradStore:
    """The weight-gradient work queued by B passes, per key (a micro-batch), until its W pass."""

    def __init__(self) -> None:
        self._collecting: Optional[Hashable] = None
        self.deferred_total = 0  # weight gradients ever deferred (for tests and logs)
        self._queues: dict[Hashable, list[tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]]] = {}

    @contextlib.contextmanager
    def deferring(self, key: Hashable) -> Iterator[None]:
        """Queue the weight gradients of the backward passes run inside under `key`."""
        if self._collecting is not None:
            raise RuntimeError(f"weight gradients are already being deferred for {self._collecting!r}")
        if key in self._queues:
            raise RuntimeError(f"weight gradients of {key!r} are queued already (its W pass has not run)")
        self._queues[key] = []
        self._collecting = key
        try:
            yield
        finally:
            self._collecting = None

    @property
    def collecting(self) -> bool:
        return self._collecting is not None

    def defer(self, param: torch.nn.Parameter, compute: Callable[[], torch.Tensor]) -> None:
        """Queue `compute` (-> the gradient of `param`) for the W pass of the key being collected."""
        if self._collecting is None:
            raise RuntimeError("WeightGradStore.defer outside deferring()")
        self._queues[self._collecting].append((param, compute))
        self.deferred_total += 1

    def pop(self, key: Hashable) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Run the W pass of `key`: every queued weight gradient, in queue order."""
        if key not in self._queues:
            raise RuntimeError(f"no weight gradients are queued for {key!r}")
        work = self._queues.pop(key)
        with torch.no_grad():
            return [(param, compute()) for param, compute in work]

    @property
    def pending(self) -> list[Hashable]:
        """Keys whose W pass has not run."""
        return list(self._queues)

    def clear(self) -> None:
        """Drop every queued W pass (a step that failed part-way)."""
        self._queues.clear()
        self._collecting = None


STORE = WeightGradStore()


def accumulate_into(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Add `grad` into `param.grad` as autograd's AccumulateGrad would (set when there is none, else add in place)."""
    if param.grad is None:
        param.grad = grad.detach().clone(memory_format=torch.contiguous_format)
    else:
        param.grad.add_(grad)


class _Linear(torch.autograd.Function):
    """y = x W^T + b (torch's own linear in the forward) whose weight gradient can be deferred to a W pass.

    The backward computes what autograd computes for F.linear, with the same products: dx = dy W,
    dW = (x^T dy)^T over the flattened tokens, db = the sum of dy over them."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.param, ctx.has_bias = weight, bias is not None  # the parameter itself, to hand its deferred gradient
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = dy.matmul(weight)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])

            def weight_grad() -> torch.Tensor:
                return x2.t().mm(dy2).t()

            if STORE.collecting:
                STORE.defer(ctx.param, weight_grad)
            else:
                dw = weight_grad()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x W^T (+ b) in the run's precision, with a weight gradient a zero-bubble schedule may defer (`STORE`)."""
    return _Linear.apply(x, weight, bias)
