"""Tensor-parallel equivalence of the whole model: TP 1/2/4, with and without sequence parallelism."""

from __future__ import annotations

import math

import pytest
import torch

from megalite.config import ModelConfig, ParallelConfig
from tests.helpers.distributed import run_ranks

GPT = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
           norm="layernorm", mlp="gelu", position="learned", bias=True, tied_embeddings=True)
LLAMA = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_hidden_size=96,
             max_position_embeddings=64, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
             tied_embeddings=False, norm_eps=1e-6)


def _reference(cfg: ModelConfig, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    from megalite.model import build_model, full_grads, full_state_dict

    ref = build_model(cfg, seed=1234)
    logits = ref(ids).detach()
    loss = ref(ids, labels=labels, loss_mask=mask)
    loss.backward()
    return full_state_dict(ref), logits, loss.detach(), full_grads(ref)


def _tp_equivalence() -> dict:
    from deepspeed.runtime.utils import clip_grad_norm_

    from megalite.errors import DataError
    from megalite.model import build_model, full_grads, full_state_dict
    from megalite.parallel import ProcessGrid
    from tests.test_parallel_layers import no_shm_comm

    no_shm_comm()
    grids = {2: ProcessGrid(tensor=2), 4: ProcessGrid(tensor=4)}
    checked = []
    torch.manual_seed(0)  # identical batch on every rank
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.randint(0, 300, (2, 16))
    mask = (torch.rand(2, 16) > 0.2).float()
    for family, shape in (("gpt", GPT), ("llama", LLAMA)):
        cfg = ModelConfig(**shape)
        ref_state, ref_logits, ref_loss, ref_grads = _reference(cfg, ids, labels, mask)
        ref_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref_grads.values()))
        for tp, grid in grids.items():
            for sp in (False, True):
                model = build_model(cfg, ParallelConfig(tensor=tp, sequence_parallel=sp), grid, seed=1234)
                # Each rank holds 1/tp of every sharded weight; replicated ones whole.
                for name, p in model.named_parameters():
                    full = ref_state[name].shape
                    if getattr(p, "tensor_model_parallel", False):
                        d = p.partition_dim
                        assert p.shape[d] * tp == full[d] and p.shape[:d] + p.shape[d + 1:] == full[:d] + full[d + 1:]
                    else:
                        assert p.shape == full, name
                assert model.embedding.word.weight.shape == (cfg.padded_vocab_size // tp, 64)
                qkv_rows = 64 + 2 * cfg.kv_heads * cfg.head_dim
                assert model.layers[0].attention.qkv.weight.shape == (qkv_rows // tp, 64)
                # Same initial model whatever the TP degree.
                state = full_state_dict(model, grid.tp_group)
                for name, t in ref_state.items():
                    torch.testing.assert_close(state[name], t, rtol=0, atol=0, msg=f"init {name}")
                logits = model(ids)
                assert logits.shape == (2, 16, cfg.padded_vocab_size // tp)
                gathered = model(ids, gather_logits=True).detach()
                torch.testing.assert_close(gathered, ref_logits, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(logits.detach(), ref_logits.chunk(tp, -1)[grid.tp_rank], rtol=1e-5,
                                           atol=1e-5)
                assert gathered[..., cfg.vocab_size:].max() < -1e30  # padding never predicted
                loss = model(ids, labels=labels, loss_mask=mask)
                torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
                loss.backward()
                grads = full_grads(model, grid.tp_group)
                for name, g in ref_grads.items():
                    msg = f"{family} tp{tp} sp{sp} {name}"
                    torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=msg)
                # DeepSpeed's clipping with the grid as mpu: TP shards counted once each, replicas once.
                norm = float(clip_grad_norm_(list(model.parameters()), max_norm=0.05, mpu=grid))
                assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
                clipped = full_grads(model, grid.tp_group)
                coef = 0.05 / (ref_norm + 1e-6)
                for name, g in ref_grads.items():
                    torch.testing.assert_close(clipped[name], g * coef, rtol=1e-4, atol=1e-7)
                # An id outside the vocabulary is named, at every TP degree (Megatron embeds zeros).
                bad = ids.clone()
                bad[1, 3] = cfg.vocab_size
                try:
                    model(bad)
                    raise AssertionError("out-of-range id accepted")
                except DataError as e:
                    assert f"token id {cfg.vocab_size}" in str(e) and f"vocab_size={cfg.vocab_size}" in str(e)
                checked.append((family, tp, sp))

    # model.loss_chunk_tokens: the output layer and loss in chunks (7 tokens: not a divisor of 2 x 16) give the
    # same loss and gradients, tied (gpt) and untied (llama), with and without sequence parallelism.
    for family, shape in (("gpt", GPT), ("llama", LLAMA)):
        cfg = ModelConfig(**shape)
        _, _, ref_loss, ref_grads = _reference(cfg, ids, labels, mask)
        for sp in (False, True):
            chunked = ModelConfig(**{**shape, "loss_chunk_tokens": 7})
            model = build_model(chunked, ParallelConfig(tensor=2, sequence_parallel=sp), grids[2], seed=1234)
            loss = model(ids, labels=labels, loss_mask=mask)
            torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
            loss.backward()
            grads = full_grads(model, grids[2].tp_group)
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"chunked {family} sp{sp} {name}")
            checked.append((family, "chunked", sp))

    # Incremental decoding at TP2: the sharded KV cache gives the full forward's logits.
    model = build_model(ModelConfig(**LLAMA), ParallelConfig(tensor=2), grids[2], seed=5)
    model.eval()
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 16)
        steps = [model(ids[:, :7], kv_cache=cache)] + [model(ids[:, i : i + 1], kv_cache=cache) for i in range(7, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    # Dropout with sequence parallelism and recompute: checkpointed blocks redraw the same masks.
    cfg = ModelConfig(**{**LLAMA, "hidden_dropout": 0.2})
    results = []
    for ckpt in (False, True):
        cfg.activation_checkpointing = ckpt
        model = build_model(cfg, ParallelConfig(tensor=2, sequence_parallel=True), grids[2], seed=99)
        model.train()
        loss = model(ids, labels=labels)
        loss.backward()
        results.append((loss.detach(), full_grads(model, grids[2].tp_group)))
        model.eval()
        with torch.no_grad():
            assert abs(float(model(ids, labels=labels)) - float(loss)) > 1e-4  # dropout was active
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-6, atol=1e-8, msg=name)
    return checked


@pytest.mark.timeout(300)
def test_tp_1_2_4_same_logits_loss_grads_and_clipped_norm() -> None:
    results = run_ranks(_tp_equivalence, 4, timeout_s=240)
    assert len(results[0]) == 12


def test_out_of_range_ids_tp1() -> None:
    from megalite.errors import DataError
    from megalite.model import build_model

    model = build_model(ModelConfig(**LLAMA), seed=1)
    for bad in (300, 10_000, -3):
        with pytest.raises(DataError, match=f"token id {bad} .*vocab_size=300"):
            model(torch.tensor([[1, 2, bad]]))
    with pytest.raises(DataError, match="label 301"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 301, 2]]))


def test_meta_device_count_matches_formula() -> None:
    from megalite.config import count_parameters
    from megalite.model import build_model

    for shape in (GPT, LLAMA, {**LLAMA, "tied_embeddings": True, "bias": True}):
        cfg = ModelConfig(**shape)
        model = build_model(cfg, device="meta")
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


_CHUNK_MEMORY = """
import json, sys, torch
from megalite.config import ModelConfig
from megalite.model import build_model
from megalite.memory import peak_anon_growth
shape = dict(vocab_size=32000, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=1024)
ids = torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(0))
out = {}
for chunk in (0, 256):
    model = build_model(ModelConfig(**shape, loss_chunk_tokens=chunk), seed=3)
    def step(model=model):
        loss = model(ids, labels=ids)
        loss.backward()
        return loss.item(), model.embedding.word.weight.grad.abs().sum().item()
    growth, (loss, grad_sum) = peak_anon_growth(step)
    out[chunk] = [growth, loss, grad_sum]
print(json.dumps(out))
"""


def test_loss_chunks_bound_the_logits_memory() -> None:
    """With model.loss_chunk_tokens the (tokens x vocabulary) logits and their fp32 softmax never exist whole:
    the forward+backward peak grows by far less than the unchunked one's, at the same loss and gradients.

    Measured in a child whose allocator hands every block over 1 MiB straight back to the system (glibc's
    adaptive threshold would otherwise keep freed ~32 MB chunks resident and blur the peak)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", _CHUNK_MEMORY], capture_output=True, text=True, env=env,
                          timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    logits_bytes = 2 * 1024 * 32000 * 4
    # fp32 sums in another order: equal to about 1e-6 relative (the loss is ln(32000) ~ 10.4).
    assert abs(out[0][1] - out[256][1]) < 1e-5 * out[0][1] and abs(out[0][2] - out[256][2]) < 1e-4 * out[0][2]
    # Unchunked holds the logits and their softmax (2 x logits_bytes); chunked a 256-token slice at a time.
    assert out[0][0] > 1.5 * logits_bytes, out
    assert out[256][0] < 0.75 * logits_bytes, out


def test_z_loss_applies_while_training_only_and_through_chunks() -> None:
    """model.z_loss adds z * mean(logsumexp^2) to the training loss (with gradients), not to evaluation
    (no gradients); the chunked loss gives the same value and gradients."""
    from megalite.model import build_model

    shape = dict(LLAMA, z_loss=1e-2)
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    model = build_model(ModelConfig(**shape), seed=8)
    with torch.no_grad():
        logits = model(ids, gather_logits=True)[..., :300].double()
        plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), ids.reshape(-1))
        assert abs(float(model(ids, labels=ids)) - float(plain)) < 1e-5  # evaluation: cross-entropy only
    expected = plain + 1e-2 * torch.logsumexp(logits, -1).square().mean()
    loss = model(ids, labels=ids)
    assert abs(loss.item() - float(expected)) < 1e-5 and float(expected - plain) > 1e-3
    loss.backward()
    chunked = build_model(ModelConfig(**shape, loss_chunk_tokens=8), seed=8)
    loss_c = chunked(ids, labels=ids)
    loss_c.backward()
    assert abs(loss_c.item() - loss.item()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
