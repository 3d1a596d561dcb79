"""FP8 training of the tensor-parallel linears: dynamic scaling and the three matmuls through `torch._scaled_mm`.

A linear y = x W^T (x: (tokens, in), W: (out, in), dy: (tokens, out)) runs three matmuls, each on operands cast to
float8 with a scale computed from their absolute maximum (amax) at that moment ("dynamic scaling"):

    forward      y  = x  W^T     x: input cast,        W: weight cast
    grad input   dx = dy W       dy: grad_output cast, W: weight_for_grad_input cast
    grad weight  dW = dy^T x     dy: grad_output_for_grad_weight cast, x: input_for_grad_weight cast

A recipe says, for each of the six casts, float8 or high precision, e4m3 or e5m2, per tensor or per row, and
whether scales are rounded down to powers of two. The recipes are torchao's (`Float8LinearConfig.from_recipe_name`:
tensorwise, rowwise, rowwise_with_gw_hp) and so are the scaling and casting steps (`tensor_to_amax`,
`amax_to_scale`, `to_fp8_saturated`). megalite's own part is what torchao's module swap cannot give its
`ColumnParallelLinear`/`RowParallelLinear` (plain autograd functions over process groups, not DTensor modules):

- the autograd function, with the weight gradient as a separate callable piece (`weight_grad`) so that a schedule
  can run it later (zero-bubble pipelines defer dW);
- the tensor-parallel amax reduction: an amax taken over a dimension that is split across the tensor-parallel
  ranks is reduced with MAX over the group, so every rank scales with the scale one process would use
  (`needs_tensor_parallel_max` has the table, per layer kind, operand and recipe);
- `scaled_matmul`, a `torch._scaled_mm` call that keeps fp32 accumulation and an fp32 result when asked (torchao's
  `addmm_float8_unwrapped` turns fp32 rowwise results into bf16), pads to the 16-multiples CUDA needs, and on the
  CPU runs torch's own emulation, which equals the dequantized fp32 matmul exactly;
- non-finite amaxes (inf/NaN in an input or gradient) give non-finite results on every rank, never zeros or
  saturated values, so the training loop's non-finite rule skips the step.

Quantizing and the scaled matmul are plain functions (`quantize`, `scaled_matmul`) for other layers (experts).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from megalite.config.schema import FP8_RECIPES as RECIPES
from megalite.parallel.deferred import STORE
from megalite.parallel.mappings import Group, group_size

# Which dimension of each 2-D operand is split across the tensor-parallel ranks, per layer kind. Operands:
# input x (tokens, in), weight W (out, in), grad_output dy (tokens, out). With sequence parallelism the tokens are
# whole here: the column-parallel layer all-gathers x before the matmul, the row-parallel layer's dy arrives
# all-gathered, so sequence parallelism changes nothing in this table.
SPLIT_DIM: dict[str, dict[str, Optional[int]]] = {
    "column": {"input": None, "weight": 0, "grad_output": 1},  # W split by output rows
    "row": {"input": 1, "weight": 1, "grad_output": None},  # W split by input columns
}

Kind = Optional[Literal["column", "row"]]


def needs_tensor_parallel_max(kind: Kind, operand: str, amax_dim: Optional[int]) -> bool:
    """Whether an amax of `operand` taken over `amax_dim` (None: the whole tensor) covers a dimension split across
    the tensor-parallel ranks of a `kind` layer, and so must be reduced with MAX over the group."""
    if kind is None:
        return False
    split = SPLIT_DIM[kind][operand]
    return split is not None and (amax_dim is None or amax_dim == split)


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    # torchao's import logs that its CUDA extensions (mxfp8, CUTLASS kernels megalite does not use) fail to load
    # on a CPU machine, and torch warns about one of its enums: both are noise here.
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao() -> Any:
    """torchao's float8 modules, imported on first use (about 1.5 s; runs without FP8 never pay it)."""
    with _quiet_torchao_import():
        import torchao.float8.config as config
        import torchao.float8.float8_utils as utils
    return config, utils


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Cast:
    """How one operand of one matmul is cast: to `dtype` (None: stays in high precision), per tensor or per row
    (`rowwise`: one scale per slice along the operand's reduced dimension)."""

    dtype: Optional[torch.dtype]
    rowwise: bool

    @property
    def high_precision(self) -> bool:
        return self.dtype is None


@dataclass(frozen=True)
class Float8Recipe:
    """The six casts of an FP8 linear, the scale rounding and the fast-accumulation flags, from torchao's recipe of
    the same name."""

    name: str
    input: Cast
    weight: Cast
    grad_output: Cast
    input_for_grad_weight: Cast
    weight_for_grad_input: Cast
    grad_output_for_grad_weight: Cast
    power_of_2_scales: bool
    fast_accum_output: bool
    fast_accum_grad_input: bool
    fast_accum_grad_weight: bool

    @staticmethod
    @functools.cache
    def named(name: str) -> Float8Recipe:
        """The recipe `name` (one of RECIPES) as torchao defines it."""
        if name not in RECIPES:
            raise ValueError(f"FP8 recipe {name!r} is not one of {', '.join(RECIPES)}")
        config, _ = _torchao()
        c = config.Float8LinearConfig.from_recipe_name(name)

        def cast(cc: Any) -> Cast:
            if cc.scaling_type is config.ScalingType.DISABLED:
                return Cast(None, False)
            return Cast(cc.target_dtype, cc.scaling_granularity is config.ScalingGranularity.AXISWISE)

        return Float8Recipe(
            name=name, input=cast(c.cast_config_input), weight=cast(c.cast_config_weight),
            grad_output=cast(c.cast_config_grad_output), input_for_grad_weight=cast(c.cast_config_input_for_grad_weight),
            weight_for_grad_input=cast(c.cast_config_weight_for_grad_input),
            grad_output_for_grad_weight=cast(c.cast_config_grad_output_for_grad_weight),
            power_of_2_scales=c.round_scales_to_power_of_2, fast_accum_output=c.gemm_config_output.use_fast_accum,
            fast_accum_grad_input=c.gemm_config_grad_input.use_fast_accum,
            fast_accum_grad_weight=c.gemm_config_grad_weight.use_fast_accum,
        )

    @property
    def reuses_input(self) -> bool:
        """The forward's float8 input serves the weight gradient too (tensorwise both times, same dtype): it is
        saved instead of the high-precision input."""
        return _same_tensorwise(self.input, self.input_for_grad_weight)

    @property
    def reuses_weight(self) -> bool:
        """The forward's float8 weight serves the input gradient too: it is saved instead of being cast again."""
        return _same_tensorwise(self.weight, self.weight_for_grad_input)

    @property
    def reuses_grad_output(self) -> bool:
        """One cast of the output gradient serves both backward matmuls."""
        return _same_tensorwise(self.grad_output, self.grad_output_for_grad_weight)


def _same_tensorwise(a: Cast, b: Cast) -> bool:
    return a == b and not a.high_precision and not a.rowwise


# ----------------------------------------------------------------------------- quantize and multiply


@dataclass
class Quantized:
    """A float8 tensor and its scale (`data` = saturate(hp * scale)): a 0-d scale per tensor, or (rows, 1) / (1,
    cols) per row or column. `t()` transposes both."""

    data: torch.Tensor
    scale: torch.Tensor

    def t(self) -> Quantized:
        return Quantized(self.data.t(), self.scale.t() if self.scale.dim() else self.scale)

    def dequantize(self) -> torch.Tensor:
        """The fp32 values the matmul sees: data / scale (as the matmul applies it: data * (1 / scale))."""
        return self.data.float() * self.scale.reciprocal()


def tensor_parallel_amax_max(amax: torch.Tensor, group: Group) -> torch.Tensor:
    """MAX of `amax` over `group`, with NaN counted as inf: gloo's MAX may drop a NaN (max(1, NaN) is 1 for one
    argument order), and a rank whose tensor holds NaN must make every rank's scale non-finite."""
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax.float())
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def quantize(hp: torch.Tensor, cast: Cast, amax_dim: Optional[int] = None, power_of_2: bool = False,
             group: Group = None) -> Quantized:
    """Cast a 2-D high-precision tensor to float8 with a dynamic scale (torchao's amax, scale and saturated cast).

    `amax_dim`: with a rowwise cast, the dimension the amax is taken over (one scale per slice of the other);
    `group`: reduce the amax with MAX over it (the caller decides when: `needs_tensor_parallel_max`). A non-finite
    amax gives a zero or NaN scale, and every value the matmul produces from it is NaN.
    """
    if cast.high_precision:
        raise ValueError("quantize: this cast keeps high precision")
    config, utils = _torchao()
    if cast.rowwise:
        amax = utils.tensor_to_amax(hp, scaling_granularity=config.ScalingGranularity.AXISWISE, axiswise_dim=amax_dim)
    else:
        amax = utils.tensor_to_amax(hp)
    if group_size(group) > 1:
        amax = tensor_parallel_amax_max(amax, group)
    scale = utils.amax_to_scale(amax, cast.dtype, round_scales_to_power_of_2=power_of_2)
    # torchao multiplies in fp32 (as torch.compile would upcast); the cast saturates at the format's largest value.
    return Quantized(utils.to_fp8_saturated(hp.to(torch.float32) * scale, cast.dtype), scale)


@contextlib.contextmanager
def _cpu_emulation(device: torch.device) -> Iterator[None]:
    # On the CPU, torch._scaled_mm goes to oneDNN when it is enabled: on CPUs without FP8 units that is a slow
    # reference kernel (3 s for a 1024x256x768 product on the 2-core CI machine against 5 ms) whose result is not
    # the dequantized product. With oneDNN off, torch's own emulation runs: (a * scale_a) @ (b * scale_b) in fp32,
    # the dequantized fp32 matmul exactly. The flag is process-wide, so it is restored at once.
    if device.type != "cpu":
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def _pad_to_16(t: torch.Tensor, dim: int) -> torch.Tensor:
    extra = -t.shape[dim] % 16
    if not extra:
        return t
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = extra
    # F.pad is not implemented for float8: pad the bytes.
    return torch.nn.functional.pad(t.view(torch.uint8), pad).view(t.dtype)


def scaled_matmul(a: Quantized, b: Quantized, out_dtype: torch.dtype, fast_accum: bool = False,
                  pad: Optional[bool] = None, scale_after: Optional[bool] = None) -> torch.Tensor:
    """(M, K) x (K, N) float8 product through `torch._scaled_mm`, accumulated in fp32, returned in `out_dtype`.

    Scales: per tensor (0-d) or per row of a (M, 1) and per column of b (1, N); a per-tensor scale next to a
    per-row one is expanded (torch's rowwise kernel takes both or neither, torchao's rule). `pad` (default: on
    CUDA) pads K and N to multiples of 16, as cuBLAS needs; zeros add nothing to the sums. `scale_after` (default:
    rowwise scales with an fp32 result on CUDA) multiplies by the scales after an unscaled fp32 product.
    """
    sa, sb = a.scale.reciprocal(), b.scale.reciprocal()
    (m, k), n = a.data.shape, b.data.shape[1]
    if sa.dim() != sb.dim():
        sa = sa.expand(m, 1) if sa.dim() == 0 else sa
        sb = sb.expand(1, n) if sb.dim() == 0 else sb
    rowwise = sa.dim() == 2
    a_data, b_data = a.data, b.data
    if pad is None:
        pad = a_data.is_cuda
    if pad and (k % 16 or n % 16):
        a_data, b_data = _pad_to_16(a_data, 1), _pad_to_16(_pad_to_16(b_data, 0), 1)
        if rowwise and n % 16:
            sb = torch.nn.functional.pad(sb, (0, -n % 16), value=1.0)
    a_data = a_data.contiguous()  # row-major
    b_data = b_data.t().contiguous().t()  # column-major
    post = None
    if scale_after is None:
        # torch's rowwise CUDA kernel writes bf16 only (pytorch issue 156771): use the per-tensor kernel with unit
        # scales and an fp32 result, and scale after (as torchao does for rowwise products without fast accumulation).
        scale_after = rowwise and a_data.is_cuda and out_dtype == torch.float32
    if scale_after:
        post, sa, sb = sa.float() * sb.float(), sa.new_ones(()), sb.new_ones(())
    with _cpu_emulation(a_data.device):
        out = torch._scaled_mm(a_data, b_data, scale_a=sa.float().contiguous(), scale_b=sb.float().contiguous(),
                               out_dtype=torch.float32 if scale_after else out_dtype, use_fast_accum=fast_accum)
    if post is not None:
        out = (out * post).to(out_dtype)
    return out[:, :n] if out.shape[1] != n else out


# ----------------------------------------------------------------------------- the linear


@dataclass
class Float8Layout:
    """One FP8 linear's recipe and tensor-parallel place: `kind` ('column' | 'row' | None) of a layer split over
    `group`."""

    recipe: Float8Recipe
    kind: Kind
    group: Group

    def cast(self, hp: torch.Tensor, cast: Cast, operand: str, amax_dim: int) -> Quantized:
        """`operand` cast with this layer's reduction: `amax_dim` applies to rowwise casts."""
        dim = amax_dim if cast.rowwise else None
        group = self.group if needs_tensor_parallel_max(self.kind, operand, dim) else None
        return quantize(hp, cast, dim, self.recipe.power_of_2_scales, group)


@dataclass
class WeightGradInputs:
    """What the weight gradient needs from the forward: the input as the recipe keeps it (2-D high precision, or
    its float8 cast when the recipe reuses it), the layer's layout and the weight's dtype."""

    input: torch.Tensor | Quantized
    layout: Float8Layout
    weight_dtype: torch.dtype


def weight_grad(inputs: WeightGradInputs, grad_output: torch.Tensor,
                grad_output_fp8: Optional[Quantized] = None) -> torch.Tensor:
    """dW = dy^T x of an FP8 linear, from its saved input and the 2-D output gradient (tokens, out).

    A separate piece so that a schedule can run it after the input gradients (zero-bubble pipelines);
    `grad_output_fp8` passes the input-gradient matmul's cast of dy when the recipe uses the same one for both.
    """
    recipe, layout = inputs.layout.recipe, inputs.layout
    x = inputs.input
    if recipe.grad_output_for_grad_weight.high_precision:  # rowwise_with_gw_hp: dW in the run's precision
        hp = x if isinstance(x, torch.Tensor) else x.dequantize()
        return torch.mm(grad_output.t().to(hp.dtype), hp).to(inputs.weight_dtype)
    if grad_output_fp8 is None or not recipe.reuses_grad_output:
        grad_output_fp8 = layout.cast(grad_output, recipe.grad_output_for_grad_weight, "grad_output", amax_dim=0)
    x_fp8 = x if isinstance(x, Quantized) else layout.cast(x, recipe.input_for_grad_weight, "input", amax_dim=0)
    return scaled_matmul(grad_output_fp8.t(), x_fp8, inputs.weight_dtype, recipe.fast_accum_grad_weight)


class _Float8Linear(torch.autograd.Function):
    """y = x W^T with the three matmuls in float8 (x: (..., in), W: (out, in)); no bias (the layers add it)."""

    @staticmethod
    def forward(ctx, x, weight, layout, out_dtype):
        recipe = layout.recipe
        x2 = x.reshape(-1, x.shape[-1])
        x_fp8 = layout.cast(x2, recipe.input, "input", amax_dim=1)
        w_fp8 = layout.cast(weight, recipe.weight, "weight", amax_dim=1)
        y = scaled_matmul(x_fp8, w_fp8.t(), out_dtype or x.dtype, recipe.fast_accum_output)
        # Saved through save_for_backward (activation checkpointing's hooks see them): float8 copies where the
        # recipe reuses them, else the high-precision tensors to cast again along the other dimension.
        keep_x = (x_fp8.data, x_fp8.scale) if recipe.reuses_input else (x2,)
        keep_w = (w_fp8.data, w_fp8.scale) if recipe.reuses_weight else (weight,)
        ctx.save_for_backward(*keep_x, *keep_w)
        ctx.layout, ctx.split, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = layout, len(keep_x), x.shape, x.dtype, weight.dtype
        ctx.param = weight  # the parameter itself, to hand a deferred gradient to
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        layout = ctx.layout
        recipe = layout.recipe
        saved = ctx.saved_tensors
        keep_x, keep_w = saved[: ctx.split], saved[ctx.split :]
        x = Quantized(*keep_x) if len(keep_x) == 2 else keep_x[0]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_fp8 = layout.cast(dy2, recipe.grad_output, "grad_output", amax_dim=1)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if len(keep_w) == 2:
                w_fp8 = Quantized(*keep_w)
            else:
                w_fp8 = layout.cast(keep_w[0], recipe.weight_for_grad_input, "weight", amax_dim=0)
            dx = scaled_matmul(dy_fp8, w_fp8, ctx.x_dtype, recipe.fast_accum_grad_input).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            inputs = WeightGradInputs(x, layout, ctx.w_dtype)
            if STORE.collecting:  # a zero-bubble schedule's B pass: dW in its W pass (megalite.parallel.deferred)
                STORE.defer(ctx.param, lambda: weight_grad(inputs, dy2, dy_fp8))
            else:
                dw = weight_grad(inputs, dy2, dy_fp8)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Float8Recipe, kind: Kind = None, group: Group = None,
               bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x W^T (+ bias) with the matmuls in float8 by `recipe`; `kind` ('column' | 'row' | None) and `group` say how
    W is split across tensor-parallel ranks, so amaxes over split dimensions are reduced over the group.
    `out_dtype` (default x's dtype): fp32 keeps a row-parallel layer's partial sums unrounded until reduced."""
    y = _Float8Linear.apply(x, weight, Float8Layout(recipe, kind if group_size(group) > 1 else None, group), out_dtype)
    return y if bias is None else y + bias
