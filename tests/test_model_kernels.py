"""The model on the Triton backend (under the interpreter) matches the torch backend."""

from __future__ import annotations

import pytest
import torch

from megalite.config import ModelConfig

SHAPES = {
    "gpt": dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32),
    "llama": dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=96,
                  norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tied_embeddings=False),
}


def _run(cfg: ModelConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from megalite.model import build_model

    model = build_model(cfg, seed=5)
    logits = model(ids).detach()
    loss = model(ids, labels=ids)
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_triton_backend_matches_torch(family: str) -> None:
    pytest.importorskip("triton")
    from megalite import kernels

    cfg = ModelConfig(**SHAPES[family])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    before = kernels.get_backend()
    try:
        kernels.set_backend("torch")
        ref = _run(cfg, ids)
        kernels.set_backend("triton")
        kernels.reset_kernel_calls()
        got = _run(cfg, ids)
        calls = kernels.kernel_calls()
    finally:
        kernels.set_backend(before)
    norm = "layer_norm" if family == "gpt" else "rms_norm"
    # Proof that Triton ran: forward and backward launches of attention and the norm, per layer.
    for key in ("attention_fwd", "attention_bwd", f"{norm}_fwd", f"{norm}_bwd"):
        assert calls.get(key, 0) >= cfg.num_layers, (key, calls)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-3, atol=1e-5, msg=name)
