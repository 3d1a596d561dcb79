"""Process grid, autograd collectives, parallel layers and vocab-parallel cross-entropy, over gloo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.distributed import run_ranks


class _MLP(torch.nn.Module):
    """Column (fused gate/up blocks) -> SwiGLU -> Row, the Megatron pair, at any TP degree."""

    def __init__(self, group, sp: bool) -> None:
        from megalite.parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.fc = ColumnParallelLinear(8, 16, group=group, sequence_parallel=sp, segments=[8, 8])
        self.proj = RowParallelLinear(8, 8, group=group, sequence_parallel=sp)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


def no_shm_comm() -> None:
    """Keep DeepSpeed from JIT-building its CPU shm_comm op (40-100 s) when the grid starts deepspeed.comm."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _grid_and_layers() -> dict:
    no_shm_comm()
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    from megalite.errors import DataError
    from megalite.model.weights import full_grads, initialize_parameters
    from megalite.parallel import (
        ProcessGrid,
        VocabParallelEmbedding,
        gather_from_tensor_parallel,
        scatter_to_sequence_parallel,
        vocab_parallel_cross_entropy,
    )

    rank = dist.get_rank()
    out: dict = {}

    # --- grid: DeepSpeed's layout (pipe, data, model), TP ranks adjacent.
    g2 = ProcessGrid(tensor=2)
    out["tp2"] = (g2.tp_rank, g2.tp_size, g2.dp_rank, g2.dp_size, g2.pp_rank, g2.pp_size)
    assert g2.get_model_parallel_world_size() == 2 and g2.get_data_parallel_world_size() == 2
    assert g2.get_tensor_model_parallel_src_rank() == rank - rank % 2
    assert g2.get_data_parallel_group_ranks() == [rank % 2, rank % 2 + 2]
    assert g2.topology.get_dim("model") == 2
    for name in ("get_model_parallel_rank", "get_model_parallel_group", "get_data_parallel_group",
                 "get_tensor_model_parallel_group", "get_pipeline_model_parallel_world_size",
                 "get_pipe_parallel_group", "get_pipeline_model_parallel_group"):
        getattr(g2, name)()
    g4 = ProcessGrid(tensor=4)
    g1 = ProcessGrid(tensor=1, pipeline=2)
    out["tp4"] = (g4.tp_rank, g4.dp_size)
    out["pp2"] = (g1.pp_rank, g1.dp_rank, g1.tp_size)

    for grid in (g2, g4):
        group = grid.tp_group
        tp, r = grid.tp_size, grid.tp_rank
        torch.manual_seed(0)  # same inputs on every rank
        x = torch.randn(2, 8, 8)
        for sp in (False, True):
            # --- column/row pair equals the unsharded layer: output and gathered gradients.
            ref, par = _MLP(None, False), _MLP(group, sp)
            initialize_parameters(ref, seed=7)
            initialize_parameters(par, seed=7, group=group)
            assert par.fc.weight.shape == (16 // tp, 8) and par.proj.weight.shape == (8, 8 // tp)
            xr = x.clone().requires_grad_()
            xp = x.clone().requires_grad_()
            yr = ref(xr)
            inp = scatter_to_sequence_parallel(xp, group) if sp else xp
            yp = par(inp)
            if sp:
                assert yp.shape == (2, 8 // tp, 8)
                torch.testing.assert_close(yp, yr.chunk(tp, dim=1)[r], rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(yp, yr, rtol=1e-5, atol=1e-6)
            (yr * yr).sum().backward()
            (yp * yp).sum().backward()  # with SP each rank's sum covers its chunk: the total is the same
            gr, gp = full_grads(ref), full_grads(par, group)
            for name in gr:
                torch.testing.assert_close(gp[name], gr[name], rtol=1e-5, atol=1e-6, msg=f"{name} sp={sp}")
            torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-5, atol=1e-6)

        # --- vocabulary-parallel embedding: same vectors, zero rows never leak, bad ids named.
        emb_ref = VocabParallelEmbedding(24, 6, vocab_size=20)
        emb = VocabParallelEmbedding(24, 6, vocab_size=20, group=group)
        initialize_parameters(emb_ref, 3)
        initialize_parameters(emb, 3, group)
        assert emb.weight.shape == (24 // tp, 6)
        ids = torch.randint(0, 20, (2, 8))
        torch.testing.assert_close(emb(ids), emb_ref(ids))
        for bad in (20, -1):
            try:
                emb(torch.tensor([[1, bad]]))
                raise AssertionError("no error for an out-of-range id")
            except DataError as e:
                assert str(bad) in str(e) and "vocab_size=20" in str(e), str(e)

        # --- vocab-parallel cross-entropy equals F.cross_entropy on the gathered logits.
        logits = torch.randn(3, 5, 24) * 4
        target = torch.randint(0, 24, (3, 5))
        full = logits.clone().requires_grad_()
        ref_loss = F.cross_entropy(full.view(-1, 24), target.view(-1), reduction="none").view(3, 5)
        shard = logits.chunk(tp, dim=-1)[r].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, group)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        weights = torch.rand(3, 5)
        (ref_loss * weights).sum().backward()
        (loss * weights).sum().backward()
        torch.testing.assert_close(shard.grad, full.grad.chunk(tp, dim=-1)[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gather_from_tensor_parallel(shard.detach(), group), logits)
        # ... plus z * logsumexp^2 with z_loss, value and gradient.
        full = logits.double().requires_grad_()
        ref_z = F.cross_entropy(full.view(-1, 24), target.view(-1), reduction="none").view(3, 5)
        ref_z = ref_z + 0.01 * torch.logsumexp(full, dim=-1).square()
        shard = logits.chunk(tp, dim=-1)[r].clone().requires_grad_()
        loss_z = vocab_parallel_cross_entropy(shard, target, group, z_loss=0.01)
        torch.testing.assert_close(loss_z.double(), ref_z, rtol=1e-5, atol=1e-6)
        (ref_z * weights).sum().backward()
        (loss_z * weights).sum().backward()
        torch.testing.assert_close(shard.grad.double(), full.grad.chunk(tp, dim=-1)[r], rtol=1e-5, atol=1e-6)

    # DeepSpeed's groups module is untouched by the grid (deepspeed.initialize sets it).
    assert ds_groups.mpu is None
    out["zero"] = _deepspeed_with_grid(g2)
    return out


def _deepspeed_with_grid(grid) -> tuple:
    """deepspeed.initialize(mpu=grid): ZeRO-1 shards over the 2 data-parallel ranks, and its clipped norm is TP1's."""
    import deepspeed

    from megalite.config import ModelConfig, ParallelConfig
    from megalite.model import build_model, full_grads

    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, norm="rmsnorm",
                      mlp="swiglu", position="rope", bias=False, tied_embeddings=False, ffn_hidden_size=96)
    ref = build_model(cfg, seed=2)
    model = build_model(cfg, ParallelConfig(tensor=2), grid, seed=2)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(4))
    ref(ids, labels=ids).backward()
    ref_norm = float(torch.sqrt(sum((p.grad**2).sum() for p in ref.parameters())))
    ref_grads = full_grads(ref)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), mpu=grid,
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
                "gradient_clipping": 0.01, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True},
    )
    assert engine.dp_world_size == 2 and engine.mp_world_size == 2
    before = {n: t.clone() for n, t in full_grads_params(engine.module, grid).items()}
    loss = engine(ids, labels=ids)
    engine.backward(loss)
    engine.step()
    norm = float(engine.get_global_grad_norm())
    assert abs(norm - ref_norm) <= 1e-4 * ref_norm, (norm, ref_norm)
    after = full_grads_params(engine.module, grid)
    coef = 0.01 / (ref_norm + 1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(before[name] - after[name], g * coef, rtol=1e-3, atol=1e-7, msg=name)
    return (engine.dp_world_size, round(norm, 4))


def full_grads_params(module, grid) -> dict:
    from megalite.model import full_state_dict

    return full_state_dict(module, grid.tp_group)


@pytest.mark.timeout(240)
def test_grid_layers_cross_entropy_world4() -> None:
    results = run_ranks(_grid_and_layers, 4)
    assert [r["tp2"] for r in results] == [(0, 2, 0, 2, 0, 1), (1, 2, 0, 2, 0, 1), (0, 2, 1, 2, 0, 1),
                                           (1, 2, 1, 2, 0, 1)]
    assert [r["tp4"] for r in results] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert [r["pp2"] for r in results] == [(0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
    assert len({r["zero"] for r in results}) == 1


def test_cross_entropy_tp1_matches_torch() -> None:
    from megalite.parallel import vocab_parallel_cross_entropy

    logits = torch.randn(4, 7, 33, requires_grad=True)
    target = torch.randint(0, 33, (4, 7))
    ref = F.cross_entropy(logits.view(-1, 33), target.view(-1))
    got = vocab_parallel_cross_entropy(logits, target).mean()
    torch.testing.assert_close(got, ref)
    (g1,) = torch.autograd.grad(ref, logits)
    (g2,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(g1, g2)
    # z-loss against float64: logits far from zero make the term (and its gradient) large.
    shifted = (logits.detach() * 3 + 5).double().requires_grad_()
    ref = (F.cross_entropy(shifted.view(-1, 33), target.view(-1), reduction="none")
           + 1e-3 * torch.logsumexp(shifted.view(-1, 33), -1).square()).mean()
    ours = shifted.detach().float().requires_grad_()
    got = vocab_parallel_cross_entropy(ours, target, z_loss=1e-3).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(ref, shifted)
    (g2,) = torch.autograd.grad(got, ours)
    torch.testing.assert_close(g2.double(), g1, rtol=1e-5, atol=1e-7)


def test_initial_values_do_not_depend_on_threads() -> None:
    """A tensor of several random chunks is the same drawn by 1 or 3 threads; a one-chunk tensor is the
    parameter's own stream (as before chunking); different chunks and names differ."""
    import zlib

    from megalite.model import weights

    n = 3 * weights.INIT_CHUNK_ELEMENTS + 5
    one = weights.init_full("layers.0.mlp.fc.weight", (n // 5, 5), ("normal", 0.02), seed=3, threads=1)
    three = weights.init_full("layers.0.mlp.fc.weight", (n // 5, 5), ("normal", 0.02), seed=3, threads=3)
    assert torch.equal(one, three)
    flat, chunk = one.view(-1), weights.INIT_CHUNK_ELEMENTS
    assert not torch.equal(flat[:chunk], flat[chunk : 2 * chunk])
    assert abs(float(one.std()) - 0.02) < 1e-4
    small = weights.init_full("x", (7, 3), ("normal", 0.02), seed=3)
    g = torch.Generator().manual_seed((3 * 1_000_003 + zlib.crc32(b"x")) % (2**63 - 1))
    assert torch.equal(small, torch.empty(7, 3).normal_(0.0, 0.02, generator=g))
    assert not torch.equal(small, weights.init_full("y", (7, 3), ("normal", 0.02), seed=3))
