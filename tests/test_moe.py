"""Mixture-of-Experts: configuration rules, routing and capacity against independent references, the grouped
matrix multiply, the MoE layer against a float64 token-by-token reference (balancing losses added explicitly and
injected), the auxiliary-loss-free bias update; then one 4-rank launch: the layer at expert parallelism 2/4 and with
TP/SP/CP against one process, whole models with q/k norms at EP2 x TP2, and training at EP2 with every ZeRO stage,
TP2 + SP, CP2 and PP2 against the plain PyTorch loop, with the checkpoints of the runs that hold every expert
evaluated and sampled on one process.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.distributed import run_ranks

# ----------------------------------------------------------------------------- configuration rules


def _cfg(world: int, **sections):
    from megalite import config as C
    from tests.helpers.engine_utils import tiny_config

    return C.from_dict(tiny_config("data", "out", **sections), world_size=world)


MOE = {"num_experts": 4, "top_k": 2}


@pytest.mark.parametrize("sections,world,fragment", [
    ({"model": {"moe": {"num_experts": 0}}}, 1, "model.moe.num_experts: must be > 0, got 0"),
    ({"model": {"moe": {"num_experts": 4, "top_k": 5}}}, 1,
     "model.moe.top_k: must be between 1 and model.moe.num_experts=4, got 5"),
    ({"model": {"moe": {**MOE, "first_dense_layers": 2}}}, 1,
     "model.moe: no layer has experts with first_dense_layers=2 and layer_interval=1 among model.num_layers=2"),
    ({"model": {"moe": {**MOE, "layer_interval": 0}}}, 1, "model.moe.layer_interval: must be > 0, got 0"),
    ({"model": {"moe": {**MOE, "bias_update_rate": 0.01}}}, 1,
     "model.moe.bias_update_rate: 0.01 updates the per-expert routing bias, which needs model.moe.expert_bias=true"),
    ({"model": {"moe": {**MOE, "capacity_factor": 0}}}, 1, "model.moe.capacity_factor: must be > 0, got 0"),
    ({"model": {"moe": {**MOE, "aux_loss": -1}}}, 1, "model.moe.aux_loss: must be >= 0, got -1"),
    ({"model": {"moe": {**MOE, "router": "tanh"}}}, 1, "model.moe.router: 'tanh' is not one of 'softmax', 'sigmoid'"),
    ({"model": {"moe": {**MOE, "experts": 4}}}, 1, "model.moe.experts: unknown key"),
    ({"model": {"moe": {**MOE, "ffn_hidden_size": 30}}, "parallel": {"tensor": 4}}, 4,
     "model.moe.ffn_hidden_size: the experts' 30 units are not divisible by parallel.tensor=4"),
    ({"model": {"moe": {**MOE, "ffn_hidden_size": 16, "shared_experts": 1, "shared_ffn_hidden_size": 6}},
      "parallel": {"tensor": 4}}, 4,
     "model.moe.shared_ffn_hidden_size: the shared experts' 6 units (shared_experts x width) are not divisible"),
    ({"model": {"qk_norm": "layer"}}, 1, "model.qk_norm: 'layer' is not one of 'head', 'projection'"),
    ({"model": {"attention_head_dim": 0}}, 1, "model.attention_head_dim: must be > 0, got 0"),
    ({"model": {"hidden_size": 30}}, 1, "model.hidden_size: 30 is not divisible by model.num_heads=4 (or set "
                                        "model.attention_head_dim)"),
    ({"parallel": {"expert": 2}}, 2, "parallel.expert: 2 splits experts over ranks, but the model has none"),
    ({"parallel": {"expert": 0}, "model": {"moe": MOE}}, 1, "parallel.expert: must be an integer > 0, got 0"),
    ({"parallel": {"expert": 3}, "model": {"moe": MOE}}, 3,
     "model.moe.num_experts: 4 experts cannot be split evenly over parallel.expert=3 ranks"),
    ({"parallel": {"expert": 4}, "model": {"moe": MOE}}, 2,
     "parallel.expert: 4 does not divide the 2 data x context replicas of the dense weights"),
    ({"parallel": {"expert": 2, "tensor": 2}, "model": {"moe": MOE}}, 2,
     "parallel.expert: 2 does not divide the 1 data x context replicas"),
    ({"parallel": {"expert": 2}, "model": {"moe": MOE},
      "deepspeed": {"zero_optimization": {"stage": 2, "reduce_scatter": False}}}, 2,
     "deepspeed.zero_optimization.reduce_scatter: false is refused with parallel.expert=2 at ZeRO-2"),
    ({"parallel": {"expert": 2}, "model": {"moe": MOE},
      "deepspeed": {"zero_optimization": {"stage": 2, "contiguous_gradients": False}}}, 2,
     "deepspeed.zero_optimization.contiguous_gradients: false is refused with parallel.expert=2 at ZeRO-2"),
])
def test_moe_rules_name_key_and_value(sections, world, fragment):
    """Config validation refuses what MoE layers and expert parallelism cannot do, naming the key and value."""
    from megalite.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        _cfg(world, **sections)
    assert fragment in str(exc.value), str(exc.value)


def test_moe_config_layers_counts_and_accepted_layouts():
    """Which layers are MoE (Qwen's decoder_sparse_step convention after the dense first layers), the parameter
    counts (total and active) against the built model, and layouts that are accepted."""
    from megalite.config import ModelConfig, MoEConfig, count_parameters, summary
    from megalite.model import build_model

    moe = MoEConfig(num_experts=4, top_k=2, first_dense_layers=1, layer_interval=2)
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=6, num_heads=2, moe=moe)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [2, 4]
    assert [i for i in range(4) if MoEConfig(num_experts=2, layer_interval=2).is_moe_layer(i)] == [1, 3]
    for layers, first, interval in itertools.product(range(1, 8), range(3), range(1, 4)):  # the closed-form count
        shaped = ModelConfig(vocab_size=50, hidden_size=16, num_layers=layers, num_heads=2,
                             moe=MoEConfig(num_experts=4, top_k=2, first_dense_layers=first, layer_interval=interval))
        assert shaped.num_moe_layers == sum(shaped.is_moe_layer(i) for i in range(layers)), (layers, first, interval)
    for shape in (dict(mlp="gelu", bias=True), dict(mlp="swiglu", bias=False, qk_norm="head"),
                  dict(mlp="swiglu", bias=True, qk_norm="projection", num_kv_heads=1)):
        moe = MoEConfig(num_experts=3, top_k=2, ffn_hidden_size=8, shared_experts=2, shared_ffn_hidden_size=4)
        cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, ffn_hidden_size=24, moe=moe,
                          **shape)
        counts = count_parameters(cfg)
        model = build_model(cfg, device="meta")
        assert sum(p.numel() for p in model.parameters()) == counts["total"]
        expert = sum(p.numel() for p in model.layers[0].mlp.experts.parameters()) // 3
        assert counts["total"] - counts["active"] == 3 * (3 - 2) * expert  # one unused expert per layer
    # Heads wider than hidden / heads (Qwen3-30B-A3B's 128 on 2048 / 32): the projections are heads x head_dim.
    cfg = ModelConfig(vocab_size=50, hidden_size=30, num_layers=2, num_heads=4, num_kv_heads=2, attention_head_dim=12,
                      mlp="swiglu", position="rope", qk_norm="head", moe=MoEConfig(num_experts=2, top_k=1))
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    assert model.layers[0].attention.qkv.weight.shape == (4 * 12 + 2 * 2 * 12, 30)
    _cfg(1, model={"hidden_size": 30, "attention_head_dim": 12})
    run = _cfg(8, parallel={"expert": 4, "context": 2}, model={"moe": MOE})
    assert summary(run, 8)["expert_parallel"] == 4
    _cfg(4, parallel={"expert": 2, "pipeline": 2}, model={"moe": MOE}, deepspeed={"zero_optimization": {"stage": 1}})
    _cfg(2, parallel={"expert": 2}, model={"moe": MOE}, deepspeed={"zero_optimization": {"stage": 3}})
    # The harness during training: every rank serves rank 0's model calls (tests/test_eval_harness.py runs it).
    _cfg(2, parallel={"expert": 2}, model={"moe": MOE}, train={"eval_tasks": {"tasks": ["x"]}})


# ----------------------------------------------------------------------------- routing and capacity (one process)


def _reference_capacity_keep(indices: list[list[int]], priority: list[list[float]], capacity: int) -> set:
    """The rule written out: per expert, its assignments by priority (high first), then token, then slot; keep the
    first `capacity`. Returns the kept (token, slot) pairs."""
    by_expert: dict[int, list] = {}
    for t, row in enumerate(indices):
        for s, e in enumerate(row):
            by_expert.setdefault(e, []).append((-priority[t][s], t, s))
    kept = set()
    for entries in by_expert.values():
        kept.update((t, s) for _, t, s in sorted(entries)[:capacity])
    return kept


def test_capacity_drops_exactly_what_the_rule_says():
    """capacity_keep against the rule written as a sort of tuples, on random routings with many ties (scores on a
    coarse grid), odd token counts and several capacities; and the layer's capacity from the factor."""
    from megalite.config import MoEConfig
    from megalite.model.moe import capacity_keep, expert_capacity

    seed = random.randrange(2**31)
    print(f"seed {seed}")
    for case_seed in (seed, 7):
        gen = torch.Generator().manual_seed(case_seed)
        for n, e, k in ((13, 4, 2), (29, 5, 3), (7, 8, 1)):
            choice = torch.rand(n, e, generator=gen)
            indices = torch.topk(choice, k, dim=-1).indices
            priority = torch.randint(0, 4, (n, k), generator=gen).float() / 4  # ties on purpose
            for capacity in (0, 1, 2, 3, n * k):
                keep = capacity_keep(indices, priority, e, capacity)
                want = _reference_capacity_keep(indices.tolist(), priority.tolist(), capacity)
                got = {(t, s) for t in range(n) for s in range(k) if keep[t, s]}
                assert got == want, (case_seed, n, e, k, capacity)
    assert expert_capacity(10, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25)) == math.ceil(1.25 * 20 / 4)
    assert expert_capacity(10, MoEConfig(num_experts=4, top_k=2)) == 20  # dropless


# ----------------------------------------------------------------------------- grouped matrix multiply


def test_grouped_mm_backends_equal_a_float64_loop():
    """kernels.grouped_mm: torch._grouped_mm (fp32 and bf16 on the CPU, 16-byte rows) and the loop give each group's
    product and gradients, empty groups included (their weight gradient is zeros, not missing); shapes the grouped
    kernel refuses fall back to the loop under 'auto' and raise under 'grouped'."""
    from megalite.kernels import KernelBackendError, grouped_mm, grouped_mm_runs

    gen = torch.Generator().manual_seed(3)
    for dtype, (k, n) in ((torch.float32, (16, 24)), (torch.bfloat16, (16, 24)), (torch.float32, (7, 5))):
        for counts in ([4, 0, 9], [0, 0, 13], [13, 0, 0], [0, 0, 0]):
            a = torch.randn(sum(counts), k, generator=gen)
            w = torch.randn(3, n, k, generator=gen)  # stored (G, N, K) as the experts are, used transposed
            g = torch.randn(sum(counts), n, generator=gen)
            ref_a, ref_w = a.double().requires_grad_(), w.double().requires_grad_()
            bounds = [0] + list(torch.tensor(counts).cumsum(0))
            ref = torch.cat([ref_a[bounds[i]:bounds[i + 1]] @ ref_w[i].t() for i in range(3)])
            ref.backward(g.double())
            backends = ["loop", "auto"] + (["grouped"] if grouped_mm_runs(a.to(dtype), w.to(dtype)) else [])
            if dtype == torch.float32 and k == 16 and sum(counts):
                assert "grouped" in backends  # the CPU runs torch's grouped kernel in fp32
            for backend in backends:
                x, wt = a.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
                out = grouped_mm(x, wt.transpose(1, 2), torch.tensor(counts), backend=backend)
                out.backward(g.to(dtype))
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                where = f"{dtype} {k}x{n} {counts} {backend}"
                torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol, msg=where)
                assert wt.grad is not None, where
                torch.testing.assert_close(wt.grad.double(), ref_w.grad, rtol=tol, atol=tol * 10,
                                           msg=lambda m, where=where: f"{where}: {m}")
                if sum(counts):
                    torch.testing.assert_close(x.grad.double(), ref_a.grad, rtol=tol, atol=tol * 10, msg=where)
    with pytest.raises(KernelBackendError, match="cannot run"):
        grouped_mm(torch.randn(3, 7), torch.randn(2, 7, 5), torch.tensor([1, 2]), backend="grouped")


# ----------------------------------------------------------------------------- the layer against float64


def reference_moe(x, router_w, w_in, w_out, moe, swiglu: bool, bias=None, shared=None):
    """The MoE layer token by token and expert by expert, in float64, written from the config's description:
    returns (output (N, H), balancing-loss term, tokens per expert before drops, assignments dropped)."""
    n, e = x.shape[0], router_w.shape[0]
    logits = x @ router_w.t()
    scores = torch.softmax(logits, -1) if moe.router == "softmax" else torch.sigmoid(logits)
    choice = (scores + (bias if bias is not None else 0)).detach()
    chosen = [sorted(range(e), key=lambda j, t=t: -float(choice[t, j]))[:moe.top_k] for t in range(n)]
    priority = [[float(scores[t, j].detach()) for j in chosen[t]] for t in range(n)]
    capacity = n * moe.top_k if moe.capacity_factor is None else math.ceil(moe.capacity_factor * n * moe.top_k / e)
    kept = _reference_capacity_keep(chosen, priority, capacity)
    out = torch.zeros_like(x)
    for t in range(n):
        weights = scores[t, chosen[t]]
        if moe.normalize_top_k:
            weights = weights / weights.sum()
        weights = weights * moe.routed_scaling
        for s, j in enumerate(chosen[t]):
            if (t, s) not in kept:
                continue
            h = w_in[j] @ x[t]
            if swiglu:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate="tanh")
            out[t] = out[t] + weights[s] * (w_out[j] @ h)
    if shared is not None:
        out = out + shared(x)
    counts = torch.zeros(e)
    for row in chosen:
        for j in row:
            counts[j] += 1
    probs = scores if moe.router == "softmax" else scores / scores.sum(-1, keepdim=True)
    aux = e * sum(counts[j] / (n * moe.top_k) * probs[:, j].mean() for j in range(e))
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return out, moe.aux_loss * aux + moe.router_z_loss * z, counts, n * moe.top_k - len(kept)


VARIANTS = {
    # name: (MoEConfig fields, model fields)
    "mixtral": (dict(num_experts=4, top_k=2, aux_loss=0.02, router_z_loss=0.003), dict(mlp="swiglu")),
    "olmoe_gelu": (dict(num_experts=8, top_k=3, normalize_top_k=False, aux_loss=0.01), dict(mlp="gelu")),
    "deepseek": (dict(num_experts=4, top_k=2, router="sigmoid", expert_bias=True, routed_scaling=2.5,
                      shared_experts=2, shared_ffn_hidden_size=5, aux_loss=0.01, router_z_loss=0.001),
                 dict(mlp="swiglu")),
    "capacity": (dict(num_experts=4, top_k=2, capacity_factor=0.5, aux_loss=0.01), dict(mlp="swiglu")),
}


def _model_config(variant: str, hidden: int = 12, ffn: int = 10, **extra):
    from megalite.config import ModelConfig, MoEConfig

    moe, model = VARIANTS[variant]
    return ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=2, num_heads=2, ffn_hidden_size=ffn + 2,
                       bias=False, moe=MoEConfig(ffn_hidden_size=ffn, **moe), **{**model, **extra})


def _layer(cfg, seed: int, dtype=torch.float32, **kwargs):
    """An MoE block of `cfg` initialised from `seed` (the same values at any split), expert bias set to a spread."""
    from megalite.model.moe import MoE
    from megalite.model.transformer import MLP
    from megalite.model.weights import initialize_parameters

    group = kwargs.get("group")
    shared = MLP(cfg, group, kwargs.get("sequence_parallel", False), dtype=dtype, ffn=cfg.shared_ffn_size) \
        if cfg.shared_ffn_size else None
    layer = MoE(cfg, dtype=dtype, shared=shared, **kwargs)
    initialize_parameters(layer, seed, group)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.3, cfg.moe.num_experts))
    return layer.train()


def test_moe_layer_equals_a_float64_token_by_token_reference():
    """The MoE block (float64, loop matmuls) against `reference_moe`: output, input and weight gradients with the
    balancing losses added explicitly (aux_loss_scale 0) and injected (scale 1: the same gradients), statistics;
    softmax with and without renormalisation, sigmoid with expert bias, scaling and shared experts, GELU experts,
    a capacity that drops; odd sizes, fresh random inputs (seed printed) and a fixed seed."""
    from megalite.model.weights import full_state_dict

    seed = random.randrange(2**31)
    print(f"seed {seed}")
    for case_seed in (seed, 11):
        for variant in VARIANTS:
            cfg = _model_config(variant)
            gen = torch.Generator().manual_seed(case_seed)
            x = torch.randn(3, 7, cfg.hidden_size, generator=gen, dtype=torch.float64)
            dy = torch.randn(3, 7, cfg.hidden_size, generator=gen, dtype=torch.float64)
            grads = {}
            for scale in (0.0, 1.0):
                layer = _layer(cfg, case_seed % 1000, torch.float64)
                layer.aux_loss_scale = scale
                xi = x.clone().requires_grad_()
                y = layer(xi)
                total = (y * dy).sum() + (layer.last_aux_loss if scale == 0 else 0)
                total.backward()
                grads[scale] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
                stats = layer.take_statistics()
            w = full_state_dict(layer)
            ref_x = x.reshape(-1, cfg.hidden_size).clone().requires_grad_()
            ref_w = {n: t.clone().requires_grad_() for n, t in w.items()}
            shared = None
            if cfg.shared_ffn_size:
                def shared(h, fc=ref_w["shared.fc.weight"], proj=ref_w["shared.proj.weight"]):
                    gate, up = (h @ fc.t()).chunk(2, -1)
                    return (F.silu(gate) * up) @ proj.t()
            out, aux, counts, dropped = reference_moe(
                ref_x, ref_w["router.weight"], ref_w["experts.w_in"], ref_w["experts.w_out"], cfg.moe,
                cfg.mlp == "swiglu", layer.router.expert_bias, shared)
            ((out * dy.reshape(out.shape)).sum() + aux).backward()
            where = f"{variant} seed {case_seed}"
            assert torch.equal(stats["tokens_per_expert"], counts.long()), where
            assert stats["dropped"] == dropped and (dropped > 0) == (variant == "capacity"), where
            for scale, (y, gx, gw) in grads.items():
                torch.testing.assert_close(y.reshape(out.shape), out.detach(), rtol=1e-10, atol=1e-10, msg=where)
                torch.testing.assert_close(gx.reshape(out.shape), ref_x.grad, rtol=1e-9, atol=1e-10, msg=where)
                for name, g in gw.items():
                    torch.testing.assert_close(g, ref_w[name].grad, rtol=1e-9, atol=1e-10,
                                               msg=lambda m, name=name, where=f"{where} scale {scale}": f"{where} {name}: {m}")
            assert abs(stats["aux_loss_sum"] * cfg.moe.aux_loss + stats["z_loss_sum"] * cfg.moe.router_z_loss
                       - float(aux.detach())) < 1e-9, where
            # Positive control: without the balancing term the router's gradient is measurably different.
            layer = _layer(cfg, case_seed % 1000, torch.float64)
            layer.aux_loss_scale = 0.0
            (layer(x) * dy).sum().backward()
            assert (layer.router.weight.grad - ref_w["router.weight"].grad).abs().max() > 1e-6, where


def test_grouped_and_loop_experts_agree_in_fp32_and_bf16():
    """The same layer through torch._grouped_mm and through the loop (16-byte rows so the grouped kernel runs)."""
    from megalite.kernels import grouped_mm

    cfg = _model_config("mixtral", hidden=16, ffn=8)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        outs = []
        for backend in ("grouped", "loop"):
            layer = _layer(cfg, 4, dtype, matmul=lambda a, w, c, b=backend: grouped_mm(a, w, c, backend=b))
            xi = x.to(dtype).clone().requires_grad_()
            y = layer(xi)
            y.float().square().sum().backward()
            outs.append((y.float(), xi.grad.float(), layer.experts.w_in.grad.float()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_aux_free_bias_moves_loads_toward_balance():
    """On a skewed input (every token's router favours expert 0), DeepSeek-V3's update from each step's loads lowers
    the overloaded expert's bias and raises the others', and the largest load falls to near the mean (top-1 and
    top-2); the biases stay centred."""
    from megalite.config import ModelConfig, MoEConfig

    for k in (1, 2):
        cfg = ModelConfig(vocab_size=64, hidden_size=8, num_layers=1, num_heads=2, mlp="swiglu", ffn_hidden_size=8,
                          moe=MoEConfig(num_experts=4, top_k=k, router="sigmoid", expert_bias=True,
                                        bias_update_rate=0.02))
        layer = _layer(cfg, 2)
        layer.router.expert_bias.zero_()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(4, 8, generator=gen))
            layer.router.weight[0, 0] = 4.0  # the first feature is 1 for every token: expert 0 wins
        x = torch.randn(1, 200, 8, generator=gen)
        x[..., 0] = 1.0
        max_loads = []
        for _ in range(30):
            with torch.no_grad():
                layer(x)
            load = layer.take_statistics()["tokens_per_expert"]
            max_loads.append(int(load.max()))
            layer.update_bias(load, cfg.moe.bias_update_rate)
        mean = 200 * k / 4
        assert max_loads[0] > 1.5 * mean and max_loads[-1] < 1.15 * mean, (k, max_loads)
        bias = layer.router.expert_bias
        assert bias[0] == bias.min() and abs(float(bias.sum())) < 1e-6, bias


def test_moe_metrics_window_log_line_and_active_flops():
    """The training record's MoE fields from the per-step statistics of a window (loads summed per layer, max/mean
    load, drops summed, balancing losses averaged over the steps that computed them), the log line, and the model
    FLOPs per token counting the active parameters (top_k experts, router, shared experts) of an MoE model."""
    from megalite.config import count_parameters
    from megalite.engine.metrics import MoEWindow, format_record, moe_fields
    from megalite.plan import flops_per_token

    window = MoEWindow()
    for tokens, dropped, aux in (([10, 2, 0, 4], 3, 1.25), ([6, 2, 8, 0], 1, None)):
        window.add([{"layer": 3, "tokens_per_expert": torch.tensor(tokens), "dropped": dropped, "aux_loss": aux,
                     "z_loss": None},
                    {"layer": 1, "tokens_per_expert": torch.tensor([8, 8, 8, 8]), "dropped": 0, "aux_loss": 1.0,
                     "z_loss": 2.5}])
    layers = window.take()
    assert window.take() == []  # reset
    assert [x["layer"] for x in layers] == [1, 3]
    assert layers[1]["tokens_per_expert"] == [16, 4, 8, 4] and layers[1]["max_load"] == 16 / 8
    assert layers[1]["dropped"] == 4 and layers[1]["aux_loss"] == 1.25 and layers[1]["z_loss"] is None
    assert layers[0]["max_load"] == 1.0 and layers[0]["aux_loss"] == 1.0 and layers[0]["z_loss"] == 2.5
    fields = moe_fields(layers)
    assert fields["moe_max_load"] == 2.0 and fields["moe_dropped"] == 4
    assert fields["moe_aux_loss"] == pytest.approx(1.125) and fields["moe_z_loss"] == 2.5
    record = {"step": 7, "loss": 3.0, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 100.0, "step_time_s": 0.5,
              "tflops_per_device": 1.0, "mfu": None, **fields}
    assert "experts max/mean load 2.00 | dropped 4 | aux 1.1250 | z 2.5000" in format_record(record)

    moe = {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 48, "shared_experts": 1, "first_dense_layers": 1}
    cfg = _cfg(1, model={"moe": moe, "num_layers": 3, "mlp": "swiglu", "ffn_hidden_size": 64})
    m, counts = cfg.model, count_parameters(cfg.model)
    h = m.hidden_size
    block = 4 * h * h + 4 * h + 2 * 2 * h  # qkv and projection with biases, two LayerNorms
    dense_mlp = 3 * h * 64 + 2 * 64 + h  # SwiGLU of 64 units with biases
    moe_mlp = 8 * h + 2 * (3 * h * 48) + (3 * h * 48 + 2 * 48 + h)  # router, top-2 experts, the shared expert
    active = 3 * block + dense_mlp + 2 * moe_mlp + 2 * h  # + the final norm
    assert counts["active"] - counts["embedding"] == active < counts["non_embedding"]
    assert flops_per_token(cfg) == 6 * active + 12 * 3 * h * cfg.data.seq_length


def test_native_weights_carry_the_expert_bias(tmp_path):
    """megalite's weights directory (`convert --out`) holds the routers' expert-bias buffers and loads them back; a
    state without them is refused, naming them."""
    from megalite.config import ModelConfig, MoEConfig
    from megalite.interop.native import load_weights, save_weights
    from megalite.model import build_model, load_full_state_dict

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, mlp="swiglu", ffn_hidden_size=8,
                      moe=MoEConfig(num_experts=4, router="sigmoid", expert_bias=True, first_dense_layers=1))
    model = build_model(cfg, seed=1)
    model.get_buffer("layers.1.mlp.router.expert_bias").copy_(torch.tensor([0.5, -0.25, 0.0, -0.25]))
    save_weights(model, tmp_path / "w", write=True)
    loaded = load_weights(tmp_path / "w")
    assert torch.equal(loaded.get_buffer("layers.1.mlp.router.expert_bias"), torch.tensor([0.5, -0.25, 0.0, -0.25]))
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in loaded.named_parameters())
    with pytest.raises(KeyError, match="missing \\['layers.1.mlp.router.expert_bias'\\]"):
        load_full_state_dict(build_model(cfg, seed=1), dict(model.named_parameters()))


# ----------------------------------------------------------------------------- the layer at EP/TP/SP/CP (4 ranks)


def _emulate_engine_reduction(layer, grid) -> None:
    """Sum each gradient where the engine combines it: expert weights split over an expert group over their
    expert-data-parallel group, every other weight over the data x context replicas."""
    import torch.distributed as dist

    from megalite.parallel.experts import expert_shard

    for p in layer.parameters():
        group = grid.get_expert_data_parallel_group() if expert_shard(p) is not None else grid.dp_proc_group
        dist.all_reduce(p.grad, group=group)


def _layer_parallel_checks(grids: dict) -> list[str]:
    """Each grid's MoE layer against the one-process layer: every data replica routes its own micro-batch (whole
    sequences; context and sequence-parallel ranks hold chunks of it), outputs and input gradients per chunk, weight
    gradients summed as the engine sums them, the balancing losses injected; statistics summed over the ranks."""
    import torch.distributed as dist

    from megalite.model.weights import full_grads

    done = []
    for name, (grid, sp, replicate, variants) in grids.items():
        tp_group = grid.get_tensor_model_parallel_group() if grid.tp_size > 1 else None
        tp, cp, ep = grid.tp_size, grid.get_sequence_parallel_world_size(), grid.get_expert_parallel_world_size()
        dp = grid.get_data_parallel_world_size()
        chunk = 12 // cp // (tp if sp else 1)
        start = grid.get_sequence_parallel_rank() * (12 // cp) + (grid.tp_rank * chunk if sp else 0)
        for variant in variants:
            cfg = _model_config("mixtral" if variant == "skewed" else variant, hidden=16, ffn=8)
            gen = torch.Generator().manual_seed(len(name) * 100 + len(variant))  # the same on every rank
            x = torch.randn(dp, 3, 12, 16, generator=gen)
            dy = torch.randn(dp, 3, 12, 16, generator=gen)
            ref = _layer(cfg, 5)
            mine = _layer(cfg, 5, group=tp_group, sequence_parallel=sp, context_group=grid.get_sequence_parallel_group(),
                          expert_group=grid.get_expert_parallel_group(), replicate_experts=replicate)
            if variant == "skewed":  # the same two experts for every token (ties): the other two get none
                for layer in (ref, mine):
                    with torch.no_grad():
                        layer.router.weight.zero_()
                        layer.router.weight[0] = 1.0
                x[..., :] = x.abs()
            ref_out, ref_dx, ref_counts = [], [], torch.zeros(cfg.moe.num_experts, dtype=torch.int64)
            for d in range(dp):
                xd = x[d].clone().requires_grad_()
                out = ref(xd)
                out.backward(dy[d])
                ref_out.append(out.detach())
                ref_dx.append(xd.grad)
                ref_counts += ref.take_statistics()["tokens_per_expert"]
            d = grid.get_data_parallel_rank()
            xi = x[d][:, start:start + chunk].clone().requires_grad_()
            out = mine(xi)
            out.backward(dy[d][:, start:start + chunk])
            where = f"{name} {variant} rank {dist.get_rank()}"
            torch.testing.assert_close(out, ref_out[d][:, start:start + chunk], rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(xi.grad, ref_dx[d][:, start:start + chunk], rtol=1e-5, atol=1e-6, msg=where)
            _emulate_engine_reduction(mine, grid)
            grads = full_grads(mine, tp_group)
            for key, p in ref.named_parameters():
                torch.testing.assert_close(grads[key], p.grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, key=key, where=where: f"{where} {key}: {m}")
            counts = mine.take_statistics()["tokens_per_expert"]
            dist.all_reduce(counts, group=grid.dp_proc_group)
            if sp:
                dist.all_reduce(counts, group=tp_group)
            assert torch.equal(counts, ref_counts), (where, counts, ref_counts)
            if variant == "skewed":
                assert int((ref_counts == 0).sum()) == 2, ref_counts  # two experts get no token
            local = mine.experts.w_in.shape[0]
            assert local == (cfg.moe.num_experts if replicate or ep == 1 else cfg.moe.num_experts // ep), where
            done.append(f"{name} {variant}")
    return done


def _model_tp_checks(grid) -> list[str]:
    """Whole MoE models with q/k norms (per head, Qwen3; over the projection, OLMoE: its sum of squares added over
    the tensor-parallel ranks) at EP2 x TP2, with and without sequence parallelism, against one process: logits,
    loss and engine-summed gradients of each replica's own batch."""
    import torch.distributed as dist

    from megalite.config import ModelConfig, MoEConfig, ParallelConfig
    from megalite.model import build_model, full_grads

    tp_group = grid.get_tensor_model_parallel_group()
    done = []
    for qk in ("head", "projection"):
        cfg = ModelConfig(vocab_size=61, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, norm="rmsnorm",
                          mlp="swiglu", position="rope", bias=False, tied_embeddings=False, ffn_hidden_size=12,
                          make_vocab_size_divisible_by=2, qk_norm=qk, norm_eps=1e-6,
                          moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8, first_dense_layers=1,
                                        aux_loss=0.01, router_z_loss=0.01))
        gen = torch.Generator().manual_seed(17)
        ids = torch.randint(0, 61, (2, 2, 10), generator=gen)
        labels = torch.randint(0, 61, (2, 2, 10), generator=gen)
        ref = build_model(cfg, seed=3)
        ref_logits, ref_losses = [], []
        for d in range(2):
            ref_logits.append(ref(ids[d], gather_logits=True).detach())
            loss = ref(ids[d], labels=labels[d])
            loss.backward()
            ref_losses.append(loss.detach())
        for sp in (False, True):
            model = build_model(cfg, ParallelConfig(tensor=2, expert=2, sequence_parallel=sp), grid, seed=3)
            d = grid.get_data_parallel_rank()
            where = f"qk {qk} sp {sp} rank {dist.get_rank()}"
            torch.testing.assert_close(model(ids[d], gather_logits=True).detach(), ref_logits[d], rtol=1e-5,
                                       atol=1e-5, msg=where)
            loss = model(ids[d], labels=labels[d])
            torch.testing.assert_close(loss.detach(), ref_losses[d], rtol=1e-6, atol=1e-6, msg=where)
            loss.backward()
            _emulate_engine_reduction(model, grid)
            grads = full_grads(model, tp_group)
            for key, p in ref.named_parameters():
                torch.testing.assert_close(grads[key], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, key=key, where=where: f"{where} {key}: {m}")
            done.append(where)
    return done


def _four_rank_layers() -> dict:
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    from megalite.parallel import ProcessGrid
    from tests.test_parallel_layers import no_shm_comm

    no_shm_comm()
    rank = dist.get_rank()
    out = {}
    every = ["mixtral", "deepseek", "capacity", "skewed", "olmoe_gelu"]
    grids = {}
    for ep in (2, 4):
        grid = ProcessGrid(expert=ep)
        # megalite's groups are DeepSpeed's E + M + D groups, registered under DeepSpeed's name.
        ep_groups, edp_groups = ds_groups._get_expert_parallel_ranks(4, 1, ep)
        assert [g for g in ep_groups if rank in g] == [grid.ep_ranks], (ep_groups, grid.ep_ranks)
        assert [g for g in edp_groups if rank in g] == [grid.edp_ranks]
        assert ds_groups._get_expert_data_parallel_group(f"ep_size_{ep}") is grid.get_expert_data_parallel_group()
        out[f"ep{ep}"] = (grid.ep_rank, grid.ep_ranks, grid.edp_ranks)
        grids[f"ep{ep}"] = (grid, False, False, every)
        grids[f"ep{ep}_replicated"] = (grid, False, True, ["deepseek"])
    tp2 = ProcessGrid(tensor=2, expert=2)
    ep_groups, edp_groups = ds_groups._get_expert_parallel_ranks(4, 2, 2)
    assert [g for g in ep_groups if rank in g] == [tp2.ep_ranks] and [g for g in edp_groups if rank in g] == [tp2.edp_ranks]
    out["ep2tp2"] = (tp2.ep_rank, tp2.ep_ranks, tp2.edp_ranks)
    grids["ep2tp2"] = (tp2, False, False, ["mixtral", "capacity", "deepseek"])
    grids["ep2tp2_sp"] = (tp2, True, False, ["mixtral", "deepseek", "skewed"])
    cp2 = ProcessGrid(context=2, expert=2)
    out["ep2cp2"] = (cp2.ep_rank, cp2.ep_ranks, cp2.edp_ranks)
    grids["ep2cp2"] = (cp2, False, False, ["mixtral", "deepseek"])
    out["layers"] = _layer_parallel_checks(grids)
    out["models"] = _model_tp_checks(tp2)
    return out


# ----------------------------------------------------------------------------- training against the plain loop

MOE_STEPS = 4  # a run trains this many steps
RESUMED_STEPS = 6  # a resumed run continues to here
FINAL_STEPS = 8  # the elastic return trip continues to here; every run's schedule has this many steps
# A Llama-shaped MoE model: GQA, RoPE, SwiGLU experts, one dense first layer, a shared expert, both balancing losses,
# the aux-free bias.
LLAMA_MOE = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
             "tied_embeddings": False, "ffn_hidden_size": 24, "num_layers": 3,
             "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 16, "first_dense_layers": 1,
                     "shared_experts": 1, "shared_ffn_hidden_size": 8, "aux_loss": 0.05, "router_z_loss": 0.01,
                     "expert_bias": True, "bias_update_rate": 0.01}}
# A GPT-shaped one: tied embeddings, learned positions, GELU experts, sigmoid routing with the aux-free bias.
GPT_MOE = {"moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 16, "router": "sigmoid", "expert_bias": True,
                   "bias_update_rate": 0.01, "aux_loss": 0.02}}
DOCS = {"reset_position_ids": True, "reset_attention_mask": True}


def _moe_raw(workdir: str, name: str, family: str, sections: dict, steps: int = MOE_STEPS) -> dict:
    """A run of `family` in `workdir/name`, trained to `steps`."""
    from tests.helpers.engine_utils import tiny_config

    model = dict(LLAMA_MOE if family == "llama" else GPT_MOE)
    model.update(sections.get("model", {}))
    raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name}", **{**sections, "model": model})
    raw["train"]["steps"] = steps
    raw["deepspeed"]["scheduler"]["params"]["total_num_steps"] = FINAL_STEPS
    return raw


def _gathered_parameters(run) -> dict[str, torch.Tensor]:
    """The run's full fp32 parameters (TP shards, expert splits, PP stages and ZeRO-3 partitions gathered)."""
    import deepspeed
    import torch.distributed as dist

    from megalite.model import full_state_dict, tensor_parallel_group
    from megalite.model.pipeline import canonical_parameters
    from megalite.parallel.sharding import gather_experts, gather_tensor

    module, group = run.engine.module, tensor_parallel_group(run.grid)
    if run.cfg.parallel.pipeline == 1:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=run.engine.zero_optimization_stage() == 3):
            return {k: v.detach().float().clone() for k, v in full_state_dict(module, group).items()}
    mine = {k: gather_experts(gather_tensor(p, p, group), p).float() for k, p in canonical_parameters(module).items()}
    stages: list = [None] * run.grid.get_pipe_parallel_world_size()
    dist.all_gather_object(stages, mine, group=run.grid.get_pipe_parallel_group())
    return {k: v for stage in reversed(stages) for k, v in stage.items()}


def _moe_train_runs(workdir: str, runs: list) -> dict:
    """Train each run of RUNS (or of the elastic trip); per run: losses and norms (rank 0 logs), final weights, the
    expert weights' local shape, the MoE statistics of the last step, the ZeRO stage and engine, and for a run that
    continues another's checkpoint, the largest difference between its engine's state right after the resume and
    the source run's own state taken as it saved (and whether their parameter and moment sets are equal)."""
    import shutil

    import torch.distributed as dist

    from megalite import config as C
    from megalite.engine.elastic import full_state_of
    from megalite.engine.trainer import Trainer
    from megalite.model.pipeline import canonical_buffers

    out = {}
    for name, family, _, _, sections, how in runs:
        first, last = how.get("steps", (0, MOE_STEPS))
        source = how.get("from")
        if source is not None and dist.get_rank() == 0:  # continue `source`'s run from its checkpoint of step `first`
            root = f"{workdir}/{name}/checkpoints"
            shutil.copytree(f"{workdir}/{source}/checkpoints", root)
            for later in (p for p in os.listdir(root) if p.startswith("step") and int(p[4:]) > first):
                shutil.rmtree(f"{root}/{later}")  # as if the job had died after step `first`'s save committed
            with open(f"{root}/latest", "w") as f:
                f.write(f"step{first:08d}\n")
        dist.barrier()
        run = Trainer(C.from_dict(_moe_raw(workdir, name, family, sections, last)))
        checked: dict = {}
        if how.get("check_state"):
            original = run.train_step

            def first_step(timer, _run=run, _original=original, _source=source, _checked=checked):
                if not _checked:  # right after the resume, before any step here
                    expected = torch.load(f"{workdir}/{_source}.state.pt")
                    mine = full_state_of(_run.engine, _run.grid)
                    _checked["same_keys"] = set(mine) == set(expected) and all(
                        set(st.moments) == set(expected[n][1]) for n, st in mine.items() if n in expected)
                    _checked["max_state_diff"] = max(
                        max([float((st.fp32 - expected[n][0]).abs().max())] +
                            [float((v - expected[n][1][k]).abs().max()) for k, v in st.moments.items()])
                        for n, st in mine.items() if n in expected)
                return _original(timer)

            run.train_step = first_step
        if how.get("keep_state"):  # the engine's own state as it saves its last checkpoint
            save = run.checkpoints.save

            def save_and_keep_state(step, last=False, _run=run, _save=save, _name=name, _last=last):
                if step == _last:
                    state = full_state_of(_run.engine, _run.grid)  # collective
                    if dist.get_rank() == 0:
                        torch.save({n: (p.fp32, p.moments) for n, p in state.items()}, f"{workdir}/{_name}.state.pt")
                return _save(step, last=last)

            run.checkpoints.save = save_and_keep_state
        code = run.train()
        records = [r for r in run.sink.records if r.get("kind") == "train"]
        experts = [p for n, p in run.engine.module.named_parameters() if n.endswith("experts.w_in")]
        out[name] = {"exit": code, "losses": [r["loss"] for r in records], "start": run.start_step,
                     "grad_norms": [r["grad_norm"] for r in records], "params": _gathered_parameters(run),
                     "stage": run.engine.zero_optimization_stage(), "engine": type(run.engine).__name__,
                     "expert_rows": experts[0].ds_shape[0] if hasattr(experts[0], "ds_shape") else experts[0].shape[0],
                     "statistics": run.strategy.moe_statistics,
                     "biases": {n: b.clone() for n, b in canonical_buffers(run.engine.module).items()},
                     "saves": [(r["step"], r["mode"]) for r in run.sink.records if r.get("kind") == "checkpoint"],
                     "resharded": [r["changes"] for r in run.sink.records if r.get("kind") == "reshard"],
                     "moe_records": [{k: v for k, v in r.items() if k.startswith("moe_")} for r in records], **checked}
        del run
    return out


def _moe_reference(workdir: str, family: str, micro: int, sections: dict | None = None) -> dict:
    """The plain PyTorch loop on one process: the same model init, data order, AdamW groups, schedule and clipping;
    each step's 4 samples split, in stream order, into the micro-batches the run's data-parallel ranks and
    accumulation steps take (`micro` samples each), the step's loss their mean, each one's balancing losses added
    to its LM loss explicitly, and the expert biases updated from the step's loads."""
    from megalite import config as C
    from megalite.data import ResumableSampler, build_datasets
    from megalite.model import build_model
    from megalite.model.moe import MoE
    from tests.helpers.engine_utils import reference_optimizer

    cfg = C.from_dict(_moe_raw(workdir, "reference", family, sections or {}))
    data = {k: getattr(cfg.data, k) for k in ("reset_position_ids", "reset_attention_mask")}
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, C.ParallelConfig(), None, seed=cfg.train.seed)
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    for block in blocks:
        block.aux_loss_scale = 0.0  # the reference adds the balancing losses itself
    train_set, _, _ = build_datasets([f"{workdir}/tok"], None, cfg.data.split, cfg.data.seq_length, cfg.train.seed,
                                     cache_dir=cfg.data.cache_dir, vocab_size=cfg.model.vocab_size, **data)
    sampler = iter(ResumableSampler(len(train_set), 0, 1, 4, cfg.train.seed))
    opt, sched = reference_optimizer(model, cfg)
    losses, norms, at = [], [], {}
    for step in range(1, FINAL_STEPS + 1):
        items = [train_set[i] for i in next(sampler)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        opt.zero_grad()
        total = 0.0
        for start in range(0, 4, micro):
            part = {k: v[start:start + micro] for k, v in batch.items()}
            extra = {"position_ids": part["position_ids"], "document_ids": part["document_ids"]} if any(data.values()) else {}
            loss = model(part["input_ids"], labels=part["labels"], loss_mask=part["loss_mask"], **extra)
            aux = sum(b.last_aux_loss for b in blocks if b.last_aux_loss is not None)
            ((loss + aux) * micro / 4).backward()
            total += loss.item() * micro / 4
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed["gradient_clipping"])))
        opt.step()
        sched.step()
        for block in blocks:
            block.update_bias(block.take_statistics()["tokens_per_expert"], block.moe.bias_update_rate)
        losses.append(total)
        if step in (MOE_STEPS, RESUMED_STEPS, FINAL_STEPS):
            at[step] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                        "biases": {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}}
    return {"losses": losses, "grad_norms": norms, "at": at}


def _assert_matches_reference(result: dict, ref: dict, name: str, logs: bool, first: int = 0,
                              last: int = MOE_STEPS) -> None:
    """Steps first+1..last of a run (a resumed run logs only those) against the reference's."""
    assert result["exit"] == 0 and result["start"] == first, name
    assert len(result["losses"]) == (last - first if logs else 0), name
    for step, (a, b) in enumerate(zip(result["losses"], ref["losses"][first:last]), start=first + 1):
        assert abs(a - b) < 1e-5, f"{name}: step {step} loss {a} vs reference {b}"
    for step, (a, b) in enumerate(zip(result["grad_norms"], ref["grad_norms"][first:last]), start=first + 1):
        assert abs(a - b) < 1e-4 * max(1.0, b), f"{name}: step {step} grad norm {a} vs {b}"
    ref = ref["at"][last]
    assert set(result["params"]) == set(ref["params"]), name
    for k, v in ref["params"].items():
        torch.testing.assert_close(result["params"][k], v, atol=1e-4, rtol=1e-3, msg=lambda m, k=k: f"{name} {k}: {m}")
    # The aux-free biases follow the same global loads (a pipeline stage holds its layers' only); a resumed run's
    # were carried by its checkpoint.
    assert result["biases"] and set(result["biases"]) <= set(ref["biases"]), name
    for k, v in result["biases"].items():
        assert torch.equal(v, ref["biases"][k]), (name, k, v, ref["biases"][k])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    from tests.helpers.engine_utils import write_token_dataset

    d = tmp_path_factory.mktemp("moe")
    write_token_dataset(str(d / "tok"))
    return str(d)


ZERO = {s: {"zero_optimization": {"stage": s}} for s in range(4)}
SPLIT_DOCS = {"parallel": {"expert": 2, "context": 2}, "data": DOCS, "deepspeed": ZERO[2]}
# (name, family, micro-batch of the reference's split, packed documents, sections, how) on 4 ranks, global batch 4;
# `how`: the steps it trains (first, last), the run whose checkpoint of step `first` it continues, whether it keeps
# its engine's state as it saves its last checkpoint, whether it compares its state after the resume with it.
RUNS = [
    # EP2 at ZeRO-0 over DP4 (GPT: sigmoid routing, aux-free bias) and at ZeRO-3 over DP2 x CP2 (Llama: a dense
    # first layer, a shared expert, both balancing losses, whose gradient carries the context scale ZeRO-3 needs):
    # every expert held by every rank (ZeRO-3-partitioned over data x context), the computation split.
    ("ep2_zero0", "gpt", 1, False, {"parallel": {"expert": 2},
                                    "deepspeed": {**ZERO[0], "train_micro_batch_size_per_gpu": 1}}, {}),
    ("ep2cp2_zero3", "llama", 2, False, {"parallel": {"expert": 2, "context": 2}, "deepspeed": ZERO[3]}, {}),
    # Sequence parallelism, activation checkpointing and the chunked loss; experts split over EP2 x TP2 (ZeRO-1).
    ("ep2tp2_sp", "llama", 2, False, {"parallel": {"expert": 2, "tensor": 2, "sequence_parallel": True},
                                      "model": {"activation_checkpointing": True, "loss_chunk_tokens": 5},
                                      "deepspeed": ZERO[1]}, {}),
    # Expert groups of context pairs, packed documents, ZeRO-2 (DP2 x CP2): experts split over EP2 and their states
    # over the expert-data-parallel pairs. Step 2 is saved in the background, step 4 (the last) synchronously.
    ("ep2cp2_docs_zero2", "llama", 2, True, {**SPLIT_DOCS, "train": {"checkpoint_interval": 2}},
     {"keep_state": True}),
    # Its background-written step 2 resumed in a new engine (exact resume: every rank's experts restored) to step 6.
    ("ep2cp2_docs_zero2_resumed", "llama", 2, True, SPLIT_DOCS,
     {"from": "ep2cp2_docs_zero2", "steps": (2, RESUMED_STEPS)}),
    # Elastic resume of its step 4 without expert parallelism: EP2 -> EP1 (x DP2 x CP2), ZeRO-2; then back to EP2 at
    # ZeRO-1 from that run's step 6. Each continues with the source run's own optimizer state, bit for bit.
    ("ep1cp2_docs_zero2_elastic", "llama", 2, True, {**SPLIT_DOCS, "parallel": {"expert": 1, "context": 2}},
     {"from": "ep2cp2_docs_zero2", "steps": (MOE_STEPS, RESUMED_STEPS), "keep_state": True, "check_state": True}),
    ("ep2cp2_docs_zero1_elastic", "llama", 2, True, {**SPLIT_DOCS, "deepspeed": ZERO[1]},
     {"from": "ep1cp2_docs_zero2_elastic", "steps": (RESUMED_STEPS, FINAL_STEPS), "check_state": True}),
    # Pipeline last (DeepSpeed cannot build a plain engine after a pipeline one): tied embeddings across stages,
    # DeepSpeed's reentrant activation checkpointing, 2 accumulation steps, documents.
    ("ep2pp2_docs", "gpt", 1, True, {"parallel": {"expert": 2, "pipeline": 2}, "data": DOCS,
                                     "model": {"activation_checkpointing": True},
                                     "deepspeed": {**ZERO[1], "train_micro_batch_size_per_gpu": 1,
                                                   "gradient_accumulation_steps": 2}}, {}),
]
# Rows of each run's stacked expert weights on a rank: the local experts where split (ZeRO-1/2), else all 4.
LOCAL_EXPERTS = {"ep2_zero0": 4, "ep2cp2_zero3": 4, "ep2tp2_sp": 2, "ep2cp2_docs_zero2": 2,
                 "ep2cp2_docs_zero2_resumed": 2, "ep1cp2_docs_zero2_elastic": 4, "ep2cp2_docs_zero1_elastic": 2,
                 "ep2pp2_docs": 2}


def _train(workdir: str, runs: list) -> dict:
    from tests.test_parallel_layers import no_shm_comm

    no_shm_comm()
    return _moe_train_runs(workdir, runs)


def _check_runs(results: list, runs: list, workdir: str) -> None:
    refs: dict = {}
    for name, family, micro, docs, _, how in runs:
        key = (family, micro, docs)
        if key not in refs:
            refs[key] = _moe_reference(workdir, family, micro, {"data": DOCS} if docs else None)
        first, last = how.get("steps", (0, MOE_STEPS))
        for rank, r in enumerate(results):
            assert r[name]["expert_rows"] == LOCAL_EXPERTS[name], (name, r[name]["expert_rows"])
            _assert_matches_reference(r[name], refs[key], f"{name} rank {rank}", logs=rank == 0, first=first,
                                      last=last)
            stats = r[name]["statistics"]  # the last step's loads: every token of the global batch, k times
            assert stats and all(int(s["tokens_per_expert"].sum()) == 4 * 16 * 2 for s in stats), (name, stats)
            if rank == 0:
                _check_moe_records(r[name]["moe_records"], stats, family, name)
            if how.get("check_state"):
                # Data movement only: the source run's own state, bit for bit, parameter and moment sets equal.
                assert r[name]["same_keys"] is True and r[name]["max_state_diff"] == 0.0, \
                    (name, r[name]["same_keys"], r[name]["max_state_diff"])
                if rank == 0:  # the rank that logs: one elastic resume, across expert-parallel degrees
                    assert len(r[name]["resharded"]) == 1 and any("expert" in c for c in r[name]["resharded"][0]), name
    assert all(b.abs().sum() > 0 for ref in refs.values() for b in ref["at"][MOE_STEPS]["biases"].values())  # moved


def _check_moe_records(records: list[dict], last_step: list[dict], family: str, name: str) -> None:
    """The training log's MoE fields (one step per record): every MoE layer of the model (a pipeline run's joined
    from both stages), each layer's tokens per expert summing to the step's assignments, max/mean load and the
    worst layer recomputed, no drops (dropless), the balancing losses' values (both coefficients or one set); the
    last record's layers equal the statistics the strategy kept for the step."""
    layers = [1, 2] if family == "llama" else [0, 1]
    assert records, name
    for record in records:
        assert [x["layer"] for x in record["moe_layers"]] == layers, (name, record)
        for x in record["moe_layers"]:
            tokens = x["tokens_per_expert"]
            assert sum(tokens) == 4 * 16 * 2 and x["dropped"] == 0, (name, x)
            assert x["max_load"] == pytest.approx(max(tokens) / (sum(tokens) / len(tokens)))
            assert x["aux_loss"] is not None and x["z_loss"] is not None, (name, x)  # computed with either coefficient
        assert record["moe_max_load"] == max(x["max_load"] for x in record["moe_layers"]) >= 1.0
        assert record["moe_dropped"] == 0
        assert record["moe_aux_loss"] == pytest.approx(sum(x["aux_loss"] for x in record["moe_layers"]) / 2)
    logged = {x["layer"]: x for x in records[-1]["moe_layers"]}
    for s in last_step:
        assert logged[s["layer"]]["tokens_per_expert"] == s["tokens_per_expert"].tolist(), name
        assert logged[s["layer"]]["aux_loss"] == s["aux_loss"] and logged[s["layer"]]["z_loss"] == s["z_loss"], name


def _four_ranks(workdir: str) -> dict:
    out = _four_rank_layers()
    runs = [r for r in RUNS if "pp2" not in r[0]]
    out.update(_train(workdir, runs))
    out.update(_train(workdir, [r for r in RUNS if r not in runs]))  # the pipeline last
    return out


def test_moe_layer_and_training_at_four_ranks_match_one_process(workdir):
    """The layer at EP2, EP4 (experts split, and every expert held with only the computation split), EP2 x TP2 with
    and without sequence parallelism, EP2 x CP2: outputs, input gradients and engine-summed weight gradients equal
    the one-process layer's (softmax and sigmoid routers, expert bias, shared experts, GELU experts, a capacity,
    experts that receive no token); whole models with q/k norms at EP2 x TP2 (+SP). Training at EP2 x DP4 with
    ZeRO-0, EP2 x CP2 x DP2 with ZeRO-3, EP2 x TP2 + SP (ZeRO-1, activation checkpointing, chunked loss), EP2 x CP2
    (ZeRO-2, packed documents; its background-written checkpoint resumed in a new engine), elastic resume EP2 ->
    EP1 x DP2 (ZeRO-2) and back to EP2 (ZeRO-1), and EP2 x PP2 (ZeRO-1, documents, accumulation, reentrant
    checkpointing): losses within 1e-5, norms, weights and expert biases as the plain loop's, the optimizer state
    after each elastic resume the source run's bit for bit. Every checkpoint (split experts included) consolidates
    to the run's weights and expert biases; evaluation, generation and `train.init_from` run on them."""
    results = run_ranks(_four_ranks, 4, workdir, timeout_s=600, collective_timeout_s=90)
    # Placement: expert groups are consecutive replicas, expert-data-parallel groups stride over them.
    assert [r["ep2"] for r in results] == [(0, [0, 1], [0, 2]), (1, [0, 1], [1, 3]), (0, [2, 3], [0, 2]),
                                           (1, [2, 3], [1, 3])]
    assert [r["ep4"][0] for r in results] == [0, 1, 2, 3] and results[0]["ep4"][2] == [0]
    assert [r["ep2tp2"] for r in results] == [(0, [0, 2], [0]), (0, [1, 3], [1]), (1, [0, 2], [2]), (1, [1, 3], [3])]
    assert [r["ep2cp2"][1] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # the context pairs
    assert len(results[0]["layers"]) == 2 * (5 + 1) + 3 + 3 + 2 and len(results[0]["models"]) == 4
    _check_runs(results, RUNS, workdir)
    assert results[0]["ep2pp2_docs"]["engine"] == "PipelineEngine"
    assert results[0]["ep2cp2_zero3"]["stage"] == 3 and results[0]["ep2_zero0"]["stage"] == 0
    # The background path: step 2 written asynchronously, the last step synchronously; the resume read step 2.
    assert results[0]["ep2cp2_docs_zero2"]["saves"] == [(2, "async"), (4, "sync")]
    _check_checkpoint_inference(workdir, results)
    _check_offline_reshard(workdir)


def _check_offline_reshard(workdir: str) -> None:
    """`megalite checkpoint reshard --expert 2` of the EP1 x CP2 x DP2 ZeRO-2 checkpoint to EP2 x DP2 at ZeRO-1 (2 CPU
    processes): the written checkpoint splits the experts, and its full training state (weights, moments, step,
    expert biases) is the source's bit for bit."""
    from megalite.checkpoint.reshard import TrainingState
    from megalite.cli import main

    source, out = f"{workdir}/ep1cp2_docs_zero2_elastic", f"{workdir}/offline_ep2"
    os.makedirs(out)
    assert main(["checkpoint", "reshard", source, "--out", f"{out}/checkpoints", "--tensor", "1", "--pipeline", "1",
                 "--data", "2", "--expert", "2", "--zero", "1"]) == 0
    theirs, mine = TrainingState(source), TrainingState(out)
    assert mine.layout.expert == 2 and mine.layout.zero_stage == 1 and mine.expert_split == 2
    assert theirs.expert_split == 1 and mine.names() == theirs.names()
    for name in theirs.names():
        a, b = theirs.parameter(name), mine.parameter(name)
        assert torch.equal(a.fp32, b.fp32) and a.step == b.step and set(a.moments) == set(b.moments), name
        assert all(torch.equal(a.moments[k], b.moments[k]) for k in a.moments), name
    assert all(torch.equal(b, mine.buffers()[k]) for k, b in theirs.buffers().items())


def _check_checkpoint_inference(workdir: str, results: list) -> None:
    """Every run's last checkpoint, experts split or not, consolidates to the weights and expert biases the run held;
    `megalite eval`'s function and generation (with and without the KV cache) run on the checkpoints on one process,
    and `train.init_from`'s state loads into a model with the biases."""
    from megalite.checkpoint.consolidate import load_full_weights, model_from_checkpoint
    from megalite.config import ParallelConfig
    from megalite.engine.trainer import initial_state
    from megalite.evaluate import evaluate_checkpoint, evaluate_model
    from megalite.model import build_model, load_full_state_dict
    from megalite.model.sampling import generate_ids

    result = results[0]
    for name, *_ in RUNS:
        _, state, _ = load_full_weights(f"{workdir}/{name}")
        biases = {k: v for r in results for k, v in r[name]["biases"].items()}  # every pipeline stage's
        held = {**result[name]["params"], **biases}
        assert set(state) == set(held), (name, sorted(set(state) ^ set(held)))
        for key, tensor in held.items():
            assert torch.equal(state[key].float(), tensor), (name, key)
    for name in ("ep2_zero0", "ep2cp2_zero3", "ep2cp2_docs_zero2"):
        cfg, model, _ = model_from_checkpoint(f"{workdir}/{name}")
        assert cfg.parallel.expert == 2 and model.config.moe is not None
        for key, bias in result[name]["biases"].items():
            assert torch.equal(model.get_buffer(key), bias), (name, key)
        evaluated = evaluate_checkpoint(f"{workdir}/{name}", batch_size=3, max_samples=5)
        assert evaluated["tokens"] == 5 * 16 and math.isfinite(evaluated["loss"]), evaluated
        prompt = torch.tensor([[5, 9, 13, 2, 7]])
        cached = generate_ids(model, prompt, max_new_tokens=8, use_cache=True)
        assert torch.equal(cached, generate_ids(model, prompt, max_new_tokens=8, use_cache=False)), name
        if not cfg.data.reset_attention_mask:  # the plain valid set: whole sequences
            assert evaluate_model(model, _valid_set(cfg), batch_size=5, max_samples=5)["loss"] == \
                pytest.approx(evaluated["loss"], rel=1e-6)
        # train.init_from: the checkpoint's weights and biases, into a model of one process.
        fresh = build_model(cfg.model, ParallelConfig(), None, seed=0)
        load_full_state_dict(fresh, initial_state(f"{workdir}/{name}", cfg.model))
        for key, bias in result[name]["biases"].items():
            assert torch.equal(fresh.get_buffer(key), bias), (name, key)


def _valid_set(cfg):
    from megalite.data import build_datasets

    _, valid, _ = build_datasets(cfg.data.prefixes, None, cfg.data.split, cfg.data.seq_length, cfg.train.seed,
                                 cache_dir=cfg.data.cache_dir, vocab_size=cfg.model.vocab_size)
    return valid
