"""Incremental decoding with a KV cache gives the logits of a full forward pass."""

from __future__ import annotations

import pytest
import torch

from megalite.config import ModelConfig
from tests.test_model_parallel import GPT, LLAMA


@pytest.mark.parametrize("shape", [GPT, LLAMA], ids=["gpt", "llama"])
def test_kv_cache_matches_full_forward(shape: dict) -> None:
    from megalite.model import build_model

    model = build_model(ModelConfig(**shape), seed=3)
    model.eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=16)
        pieces = [model(ids[:, :5], kv_cache=cache)]  # prefill
        for i in range(5, 9):  # one token at a time
            pieces.append(model(ids[:, i : i + 1], kv_cache=cache))
        pieces.append(model(ids[:, 9:], kv_cache=cache))  # a chunk after a prefix
        assert cache.length == 12
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KV cache holds 16"):
            model(ids[:, :5], kv_cache=cache)
        # Rewind: recompute the last three positions from position 9.
        again = model(ids[:, 9:], kv_cache=cache, start_pos=9)
        torch.testing.assert_close(again, full[:, 9:], rtol=1e-5, atol=1e-5)
