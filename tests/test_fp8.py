"""FP8 training (model.fp8, megalite/parallel/fp8.py) against explicit references.

- One process: the FP8 linear of each recipe equals a reference built from explicitly quantized and dequantized
  tensors (amax, scale, saturated cast written out here, fp32 matmuls), forward and backward, bit for bit, at odd
  sizes, for a fresh seed (printed) and a fixed one; the padded and scale-after product paths; the weight gradient
  as a separate piece; non-finite amaxes; activation checkpointing; the configuration and hardware rules.
- 2 ranks (one launch): every amax of the column- and row-parallel layers at TP2, with and without sequence
  parallelism, equals TP1's; the matmuls without a cross-rank sum are bit for bit TP1's, the two with one equal the
  one-process sum of the same partial products bit for bit (and TP1 within fp32 rounding, measured); the whole
  model at TP2 (+SP) against TP1; training at ZeRO-3 x DP2 and PP2 against the one-process loop within 1e-6; a
  non-finite amax in training skips the step.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from megalite.config import ModelConfig

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FRESH_SEED = int(os.environ.get("MEGALITE_TEST_SEED", time.time_ns() % 2**31))


# ----------------------------------------------------------------------------- the reference, written out


def ref_cast(hp: torch.Tensor, dtype: torch.dtype | None, dim: int | None, power_of_2: bool) -> torch.Tensor:
    """fp32 values a matmul sees after casting `hp` to `dtype` (None: no cast) with one scale per tensor (dim None)
    or per slice along `dim`: scale = max / amax (in float64, as torchao), optionally floored to a power of two,
    data = saturate(hp * scale), dequantized as data * (1 / scale) (torch._scaled_mm's scale arguments)."""
    if dtype is None:
        return hp.float()
    amax = hp.abs().amax() if dim is None else hp.abs().amax(dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = (fmax / amax.double().clamp(min=1e-12)).float()
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    data = (hp.float() * scale).clamp(-fmax, fmax).to(dtype)
    return data.float() * scale.reciprocal()


# Per recipe: (dtype, rowwise) of x, W, dy in the forward, W and dy for dx, x and dy for dW (None: high precision),
# and power-of-two scales: torchao's recipes as its documentation states them, written out independently.
SPEC = {
    "tensorwise": dict(x=(E4M3, False), w=(E4M3, False), dy=(E5M2, False), w_dx=(E4M3, False),
                       x_dw=(E4M3, False), dy_dw=(E5M2, False), pow2=False),
    "rowwise": dict(x=(E4M3, True), w=(E4M3, True), dy=(E4M3, True), w_dx=(E4M3, True),
                    x_dw=(E4M3, True), dy_dw=(E4M3, True), pow2=True),
    "rowwise_with_gw_hp": dict(x=(E4M3, True), w=(E4M3, True), dy=(E4M3, True), w_dx=(E4M3, False),
                               x_dw=(None, False), dy_dw=(None, False), pow2=True),
}


def reference_linear(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, recipe: str):
    """(y, dx, dW) of y = x W^T by `recipe` from explicit casts, fp32 accumulation; results rounded once to the
    inputs' dtype. Rowwise slices: x and dy per token for the forward and dx, W per output row for the forward and
    per input column for dx, x and dy per column over the tokens for dW."""
    s = SPEC[recipe]

    def c(t, key, rowwise_dim):
        dtype, rowwise = s[key]
        return ref_cast(t, dtype, rowwise_dim if rowwise else None, s["pow2"])

    y = c(x, "x", 1) @ c(w, "w", 1).t()
    dx = c(dy, "dy", 1) @ c(w, "w_dx", 0)
    dw = c(dy, "dy_dw", 0).t() @ c(x, "x_dw", 0)
    if s["x_dw"][0] is None:  # high precision dW: a plain matmul in the inputs' dtype
        dw = dy.t().to(x.dtype) @ x
    return y.to(x.dtype), dx.to(x.dtype), dw.to(w.dtype)


def _check_linear(recipe: str, seed: int, m: int, k: int, n: int, dtype: torch.dtype) -> None:
    from megalite.parallel.fp8 import Float8Recipe, fp8_linear

    g = torch.Generator().manual_seed(seed)
    # A spread of magnitudes per row and column, so per-row scales differ from the per-tensor one.
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    w = (torch.randn(n, k, generator=g) * torch.rand(1, k, generator=g) * 0.05).to(dtype)
    dy = (torch.randn(m, n, generator=g) * 1e-3).to(dtype)
    xv = x.clone().reshape(1, m, k).requires_grad_()  # 3-D, as the layers see activations
    wv = w.clone().requires_grad_()
    y = fp8_linear(xv, wv, Float8Recipe.named(recipe))
    y.backward(dy.reshape(1, m, n))
    ry, rdx, rdw = reference_linear(x, w, dy, recipe)
    where = f"{recipe} seed {seed} {m}x{k}x{n} {dtype}"
    assert y.dtype == dtype and xv.grad.dtype == dtype and wv.grad.dtype == dtype, where
    assert torch.equal(y.reshape(m, n), ry), f"{where} forward: max diff {(y.reshape(m, n) - ry).abs().max()}"
    assert torch.equal(xv.grad.reshape(m, k), rdx), f"{where} dx: max diff {(xv.grad.reshape(m, k) - rdx).abs().max()}"
    assert torch.equal(wv.grad, rdw), f"{where} dW: max diff {(wv.grad - rdw).abs().max()}"
    # And it is an FP8 result: near the high-precision product, not equal to it.
    exact = x.double() @ w.double().t()
    rel = float((y.detach().reshape(m, n).double() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.1, (where, rel)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_equals_explicit_quantize_dequantize_reference(recipe):
    """Forward, dx and dW bit for bit equal to the written-out recipe at odd sizes, fp32 and bf16, a fixed and a
    fresh seed (MEGALITE_TEST_SEED=N repeats one)."""
    print(f"fresh seed {FRESH_SEED} (MEGALITE_TEST_SEED={FRESH_SEED} repeats it)")
    for seed in (1234, FRESH_SEED):
        for m, k, n in ((21, 37, 29), (45, 83, 61)):
            _check_linear(recipe, seed, m, k, n, torch.float32)
        _check_linear(recipe, seed, 33, 48, 19, torch.bfloat16)


def test_scaled_matmul_paths_and_weight_grad_piece():
    """The padded product (CUDA's 16-multiples) equals the unpadded one bit for bit; the scale-after product
    (CUDA's fp32 rowwise path) equals it within fp32 rounding; dW computed later from the saved pieces equals the
    autograd one bit for bit (what a zero-bubble schedule needs)."""
    from megalite.parallel.fp8 import (
        Cast,
        Float8Layout,
        Float8Recipe,
        WeightGradInputs,
        quantize,
        scaled_matmul,
        weight_grad,
    )

    g = torch.Generator().manual_seed(FRESH_SEED)
    a, b = torch.randn(23, 37, generator=g), torch.randn(29, 37, generator=g)
    for rowwise in (False, True):
        cast = Cast(E4M3, rowwise)
        qa, qb = quantize(a, cast, 1), quantize(b, cast, 1)
        plain = scaled_matmul(qa, qb.t(), torch.float32, pad=False)
        padded = scaled_matmul(qa, qb.t(), torch.float32, pad=True)
        assert torch.equal(plain, padded), rowwise
        after = scaled_matmul(qa, qb.t(), torch.float32, pad=True, scale_after=True)
        # the same fp32 products, scaled at the end: rounding differs by about 1e-7 of the largest terms
        torch.testing.assert_close(after, plain, rtol=0, atol=1e-6 * float(plain.abs().max()))
        assert after.shape == (23, 29)
    # mixed granularity: a per-row a with a per-tensor b
    mixed = scaled_matmul(quantize(a, Cast(E4M3, True), 1), quantize(b, Cast(E4M3, False)).t(), torch.float32)
    assert torch.equal(mixed, ref_cast(a, E4M3, 1, False) @ ref_cast(b, E4M3, None, False).t())

    for name in RECIPES:
        recipe = Float8Recipe.named(name)
        x = torch.randn(2, 9, 37, generator=g, requires_grad=True)
        w = torch.randn(29, 37, generator=g, requires_grad=True)
        dy = torch.randn(2, 9, 29, generator=g)
        from megalite.parallel.fp8 import fp8_linear

        fp8_linear(x, w, recipe).backward(dy)
        layout = Float8Layout(recipe, None, None)
        saved = x.detach().reshape(-1, 37)
        if recipe.reuses_input:
            saved = layout.cast(saved, recipe.input, "input", 1)
        later = weight_grad(WeightGradInputs(saved, layout, w.dtype), dy.reshape(-1, 29))
        assert torch.equal(later, w.grad), name


def test_nonfinite_amax_gives_nonfinite_results_not_zeros():
    """An inf or NaN in an input or an output gradient makes the amax non-finite; the outputs and gradients it
    touches become non-finite (never zeros or saturated finite values: the loop's non-finite rule sees them) and
    nothing raises."""
    from megalite.parallel.fp8 import Float8Recipe, fp8_linear

    for name in RECIPES:
        recipe = Float8Recipe.named(name)
        for bad in (float("inf"), float("nan")):
            x = torch.randn(5, 16)
            x[2, 3] = bad
            w = torch.randn(8, 16, requires_grad=True)
            y = fp8_linear(x.requires_grad_(), w, recipe)
            if recipe.input.rowwise:  # one scale per token: the bad token's outputs only
                assert y[2].isnan().all() and y[[0, 1, 3, 4]].isfinite().all(), (name, bad)
            else:
                assert y.isnan().all(), (name, bad)
            # A bad output gradient reaches dx and dW (NaN through a float8 cast, inf or NaN through rowwise_with_gw_hp's
            # high-precision dW).
            x2 = torch.randn(5, 16, requires_grad=True)
            y2 = fp8_linear(x2, w, recipe)
            dy = torch.ones_like(y2)
            dy[1, 4] = bad
            w.grad = None
            y2.backward(dy)
            assert x2.grad.isnan().any() and not w.grad.isfinite().all(), (name, bad)


# ----------------------------------------------------------------------------- the model, one process

TINY = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)
LLAMA = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_hidden_size=96,
             max_position_embeddings=64, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
             tied_embeddings=False, norm_eps=1e-6)


def test_model_fp8_layers_checkpointing_and_precision():
    """model.fp8 puts the chosen block linears in FP8 (nothing else); the loss moves from the full-precision one
    by an FP8-sized amount; activation checkpointing recomputes the same FP8 forward (bit for bit)."""
    from megalite.config import Float8Config
    from megalite.model import build_model

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    plain = build_model(ModelConfig(**LLAMA), seed=5)
    base = float(plain(ids, labels=ids))
    for recipe in RECIPES:
        cfg = ModelConfig(**LLAMA, fp8=Float8Config(recipe=recipe, layers=["attention.qkv", "mlp.fc", "mlp.proj"]))
        results = []
        for ckpt in (False, True):
            cfg.activation_checkpointing = ckpt
            model = build_model(cfg, seed=5)
            block = model.layers[0]
            assert block.attention.qkv.fp8.name == recipe and block.mlp.fc.fp8 and block.mlp.proj.fp8
            assert block.attention.proj.fp8 is None  # not listed
            loss = model(ids, labels=ids)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert torch.equal(results[0][0], results[1][0]), recipe
        for a, b in zip(results[0][1], results[1][1]):
            assert torch.equal(a, b), recipe
        assert 1e-5 < abs(float(results[0][0]) - base) < 0.05 * base, (recipe, float(results[0][0]), base)


def test_fp8_configuration_rules():
    """Refusals name the key and the reason: fp16 precision, layers FP8 cannot run, unknown recipes, duplicates;
    a CUDA device below sm_89 is refused at start-up; `--set model.fp8.recipe=...` builds the section."""
    from megalite import config as C
    from megalite.errors import ConfigError
    from tests.engine_utils import tiny_config

    raw = tiny_config("/nonexistent/tok", "/tmp/x", model={"fp8": {"recipe": "rowwise"}})
    cfg = C.from_dict(raw)
    assert cfg.model.fp8 == C.Float8Config(recipe="rowwise", layers=["attention.qkv", "attention.proj", "mlp.fc",
                                                                          "mlp.proj"])
    assert C.from_dict(cfg.to_dict()).model.fp8 == cfg.model.fp8
    over = C.apply_overrides(tiny_config("/x", "/tmp/x"), ["model.fp8.recipe=rowwise_with_gw_hp"])
    assert C.from_dict(over).model.fp8.recipe == "rowwise_with_gw_hp"
    cases = [
        ({"fp8": {"recipe": "delayed"}}, {}, "model.fp8.recipe: 'delayed' is not one of 'tensorwise', 'rowwise'"),
        ({"fp8": {"layers": ["output"]}}, {}, "model.fp8.layers[0]: 'output': the output layer stay in the run's precision"),
        ({"fp8": {"layers": ["mlp.fc", "mlp.fcc"]}}, {}, "model.fp8.layers[1]: 'mlp.fcc' is not one of"),
        ({"fp8": {"layers": ["mlp.fc", "mlp.fc"]}}, {}, "model.fp8.layers[1]: 'mlp.fc' is listed twice"),
        ({"fp8": {"layers": []}}, {}, "model.fp8.layers: empty"),
        ({"fp8": {}}, {"fp16": {"enabled": True}}, "model.fp8: not available with deepspeed.fp16.enabled"),
    ]
    for model, ds, fragment in cases:
        with pytest.raises(ConfigError) as e:
            C.from_dict(tiny_config("/x", "/tmp/x", model=model, deepspeed=ds))
        assert fragment in str(e.value), str(e.value)
    C.from_dict(tiny_config("/x", "/tmp/x", model={"fp8": {}}, deepspeed={"bf16": {"enabled": True}}))

    from megalite.engine.preflight import fp8_device_problem

    assert "sm_80" in fp8_device_problem((8, 0), "NVIDIA A100-SXM4-80GB") and "8.9" in fp8_device_problem((8, 0), "A100")
    assert fp8_device_problem((8, 9), "NVIDIA L40S") is None and fp8_device_problem((9, 0), "NVIDIA H100") is None
