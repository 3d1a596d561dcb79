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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", sorted(SHAPES))
def test_packed_documents_equal_separate_documents(family: str, backend: str) -> None:
    """A packed sample with document_ids (and positions restarting per document) gives each document the
    logits and loss it gets alone, on both backends; without document_ids the later documents differ."""
    if backend == "triton":
        pytest.importorskip("triton")
    from megalite import kernels
    from megalite.data.dataset import make_sample
    from megalite.model import build_model

    eod = 0
    lengths = [5, 1, 9, 3]  # documents including their EOD; a one-token document too
    gen = torch.Generator().manual_seed(11)
    docs = [torch.cat([torch.randint(1, 300, (n - 1,), generator=gen), torch.tensor([eod])]) for n in lengths]
    stream = torch.cat([*docs, torch.tensor([7])])  # seq+1 tokens
    sample = make_sample(stream.numpy(), eod, reset_position_ids=True, eod_mask_loss=False, reset_attention_mask=True)
    assert sample["document_ids"].tolist() == [0] * 5 + [1] + [2] * 9 + [3] * 3
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    cfg = ModelConfig(**SHAPES[family])
    before = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        model = build_model(cfg, seed=5)
        ids, pos, doc_ids = (sample[k].unsqueeze(0) for k in ("input_ids", "position_ids", "document_ids"))
        with torch.no_grad():
            packed = model(ids, position_ids=pos, document_ids=doc_ids)
            unmasked = model(ids, position_ids=pos)
            start = 0
            for n, doc in zip(lengths, docs):
                alone = model(doc.unsqueeze(0))
                torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
                start += n
        assert not torch.allclose(unmasked[:, 5:], packed[:, 5:], atol=1e-3), "the mask must change later documents"
        loss = model(ids, labels=sample["labels"].unsqueeze(0), position_ids=pos, document_ids=doc_ids)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        kernels.set_backend(before)
