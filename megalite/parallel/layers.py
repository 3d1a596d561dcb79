"""Megatron-style tensor-parallel layers.

Activations are (batch, seq, hidden). With sequence parallelism the regions outside the
column/row pairs hold (batch, seq/tp, hidden): a column-parallel layer all-gathers the sequence on
entry (reduce-scatter of the gradient), a row-parallel layer reduce-scatters on exit.

Parameters are allocated empty here; `megalite.model.weights.initialize_parameters` fills them from
the full tensor so the values do not depend on the TP degree.

Given an FP8 recipe (`fp8=`), the column/row-parallel linears run their matmuls in float8
(`megalite.parallel.fp8`); the collectives around them are the same. The row-parallel layer's partial sums then
leave the matmul in fp32 and are reduced in fp32 before the one rounding to the activations' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megalite.errors import DataError
from megalite.parallel.deferred import linear
from megalite.parallel.fp8 import Float8Recipe, fp8_linear
from megalite.parallel.mappings import (
    Group,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    group_rank,
    group_size,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
    sync_grad_across_tensor_parallel,
)


def set_tensor_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, dim: int = 0, segments: Optional[list[int]] = None
) -> None:
    """Mark a parameter as split along `dim` (in fused `segments` of the full size) or replicated."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim if is_parallel else -1
    param.partition_stride = 1
    param.megalite_segments = list(segments) if (is_parallel and segments) else None


def set_init(param: torch.Tensor, kind: str, std: float = 0.0) -> None:
    """Record how the parameter is initialised ('normal' with std, 'zeros' or 'ones')."""
    param.megalite_init = (kind, std)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel size {d}")
    return n // d


class ColumnParallelLinear(torch.nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its slice of the outputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group: Group = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        segments: Optional[list[int]] = None,
        init_std: float = 0.02,
        fp8: Optional[Float8Recipe] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.gather_output, self.fp8 = group, gather_output, fp8
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        tp = group_size(group)
        segments = segments or [out_features]
        if sum(segments) != out_features:
            raise ValueError(f"segments {segments} do not add up to out_features {out_features}")
        local = sum(_divide(s, tp, "output block") for s in segments)
        self.in_features, self.out_features, self.out_local = in_features, out_features, local
        self.weight = torch.nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, True, 0, segments)
        set_init(self.weight, "normal", init_std)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(local, device=device, dtype=dtype))
            set_tensor_parallel_attributes(self.bias, True, 0, segments)
            set_init(self.bias, "zeros")
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) or (B, T/tp, in) with sequence parallelism -> (B, T, out/tp) or (B, T, out) if gathered
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, self.group, dim=1)
        else:
            x = copy_to_tensor_parallel(x, self.group)
        if self.fp8 is None:
            y = linear(x, self.weight, self.bias)
        else:
            y = fp8_linear(x, self.weight, self.fp8, "column", self.group, self.bias)
        return gather_from_tensor_parallel(y, self.group) if self.gather_output else y


class RowParallelLinear(torch.nn.Module):
    """y = x W^T + b with W split by input columns: partial products summed across TP ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group: Group = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        fp8: Optional[Float8Recipe] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.input_is_parallel, self.fp8 = group, input_is_parallel, fp8
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        local = _divide(in_features, group_size(group), "in_features")
        self.in_features, self.out_features, self.in_local = in_features, out_features, local
        self.weight = torch.nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, True, 1)
        set_init(self.weight, "normal", init_std)
        if bias:
            # Replicated; added after the reduction so it is counted once.
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            set_tensor_parallel_attributes(self.bias, False)
            set_init(self.bias, "zeros")
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in/tp) -> (B, T, out), or (B, T/tp, out) with sequence parallelism
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.group)
        dtype = None
        if self.fp8 is None:
            y = linear(x, self.weight)
        else:
            # fp32 partial sums, reduced in fp32, rounded once: TP>1 rounds what TP=1 rounds (not the sum of rounded
            # parts); at TP=1 there is no reduction and the matmul writes x's dtype itself.
            tp = group_size(self.group)
            y = fp8_linear(x, self.weight, self.fp8, "row", self.group, out_dtype=torch.float32 if tp > 1 else None)
            dtype = x.dtype
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(y, self.group, dim=1, dtype=dtype)
        else:
            y = reduce_from_tensor_parallel(y, self.group, dtype=dtype)
        if self.bias is not None:
            # On sequence shards each rank sees part of the tokens: sum the bias gradient across TP.
            b = sync_grad_across_tensor_parallel(self.bias, self.group) if self.sequence_parallel else self.bias
            y = y + b
        return y


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's rows contribute zeros."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        vocab_size: Optional[int] = None,
        group: Group = None,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel and group_size(group) > 1
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_size = vocab_size or num_embeddings  # ids >= vocab_size (padding rows) are invalid input
        local = _divide(num_embeddings, group_size(group), "padded vocabulary")
        self.vocab_start = group_rank(group) * local
        self.vocab_end = self.vocab_start + local
        self.weight = torch.nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.weight, True, 0)
        set_init(self.weight, "normal", init_std)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise DataError naming the first id outside [0, vocab_size)."""
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bool(bad.any()):
            first = int(ids[bad].flatten()[0])
            raise DataError(
                f"token id {first} is outside the vocabulary (vocab_size={self.vocab_size}, valid ids 0.."
                f"{self.vocab_size - 1}); check that the tokenizer matches model.vocab_size"
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) -> (B, T, H), or (B, T/tp, H) with sequence parallelism
        self.check_ids(ids)
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.group, dim=1)
        return reduce_from_tensor_parallel(out, self.group)
