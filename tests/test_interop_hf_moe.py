"""Hugging Face import and export of Mixture-of-Experts families (Mixtral, Qwen3-MoE with per-head q/k norms and a
dense first layer, OLMoE with q/k norms over the whole projections): tiny random models built offline give
transformers' logits after import (from the saved directory and from the model object), exported directories load
in transformers with the same logits, the KV cache and greedy generation agree with transformers, and what no
family holds is refused naming the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

VOCAB = 101


def _hf_models() -> dict:
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return {
        "mixtral": transformers.MixtralConfig(**common, intermediate_size=24, num_hidden_layers=2,
                                              num_local_experts=4, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 5e5}),
        # A dense first layer (its own MLP width), renormalised top-k, tied embeddings.
        "qwen3_moe": transformers.Qwen3MoeConfig(**{**common, "tie_word_embeddings": True}, intermediate_size=40,
                                                 moe_intermediate_size=24, num_hidden_layers=3, head_dim=12,
                                                 num_experts=4, mlp_only_layers=[0], norm_topk_prob=True),
        "olmoe": transformers.OlmoeConfig(**common, intermediate_size=24, num_hidden_layers=2, num_experts=6,
                                          norm_topk_prob=False),
    }


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf_moe")
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    out = {"ids": ids}
    for name, config in _hf_models().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # norms start at ones: perturb every weight so each mapping shows
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.eval()
        model.save_pretrained(str(root / name))
        with torch.no_grad():
            out[name] = (root / name, model, model(ids).logits)
    return out


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_moe_import_export_and_generation_match_transformers(family: str, hf_moe: dict, tmp_path: Path) -> None:
    from megalite.interop import from_hf, to_hf
    from megalite.model.sampling import generate_ids

    path, hf_model, expected = hf_moe[family]
    ids = hf_moe["ids"]
    # The saved directory holds per-expert tensors; the model object fused ones: both import.
    disk = json.loads((path / "config.json").read_text())
    assert disk["model_type"] == family
    for source in (path, hf_model):
        model = from_hf(source, make_vocab_size_divisible_by=8).eval()
        with torch.no_grad():
            logits = model(ids, gather_logits=True)[..., :VOCAB]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=f"{family} from {type(source)}")
    moe = model.config.moe
    assert model.config.qk_norm == {"mixtral": None, "qwen3_moe": "head", "olmoe": "projection"}[family]
    assert moe.normalize_top_k == (family != "olmoe") and moe.aux_loss == 0
    assert [model.config.is_moe_layer(i) for i in range(model.config.num_layers)] == \
        {"qwen3_moe": [False, True, True]}.get(family, [True, True])

    out = to_hf(model, tmp_path / "export")
    torch.testing.assert_close(_hf_logits(out, ids), expected, rtol=1e-5, atol=1e-5, msg=f"{family} export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == disk["architectures"]

    # The KV cache: a prompt, then one token at a time, gives the full forward's logits; greedy generation gives
    # transformers' greedy continuation.
    with torch.no_grad():
        cache = model.new_kv_cache(2, 16)
        steps = [model(ids[:, :5], kv_cache=cache, gather_logits=True)]
        steps += [model(ids[:, i:i + 1], kv_cache=cache, gather_logits=True) for i in range(5, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :6]
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, 6:].tolist()
    for use_cache in (True, False):
        mine = generate_ids(model, prompt, max_new_tokens=6, temperature=0.0, use_cache=use_cache)[0, 6:].tolist()
        assert mine == theirs, (use_cache, mine, theirs)


def test_moe_families_refuse_what_they_cannot_hold(hf_moe: dict, tmp_path: Path) -> None:
    """Import refuses router jitter, OLMoE's clip_qkv and dense layers Qwen's pattern cannot place; export refuses
    sigmoid routing, shared experts, an expert bias, a scaling, a capacity, and layouts no family has."""
    from megalite.config import ModelConfig, MoEConfig
    from megalite.errors import CheckpointError, ConfigError
    from megalite.interop import from_hf
    from megalite.interop.hf import hf_architecture

    for family, change, fragment in (("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
                                     ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
                                     ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]")):
        bad = tmp_path / family
        shutil.copytree(hf_moe[family][0], bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=re.escape(fragment)):
            from_hf(bad)

    base = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, norm="rmsnorm", mlp="swiglu",
                position="rope", bias=False)
    assert hf_architecture(ModelConfig(**base, moe=MoEConfig(num_experts=4))) == "mixtral"
    assert hf_architecture(ModelConfig(**base, qk_norm="head", moe=MoEConfig(num_experts=4,
                                                                             first_dense_layers=1))) == "qwen3_moe"
    for moe, extra, fragment in (
        ({"router": "sigmoid"}, {}, "model.moe.router"),
        ({"shared_experts": 1}, {}, "model.moe.shared_experts"),
        ({"expert_bias": True}, {}, "model.moe.expert_bias"),
        ({"routed_scaling": 2.0}, {}, "model.moe.routed_scaling"),
        ({"capacity_factor": 1.5}, {}, "model.moe.capacity_factor"),
        ({"first_dense_layers": 1}, {}, "Mixtral (no q/k norm) has experts in every layer"),
        ({"first_dense_layers": 1}, {"qk_norm": "projection"}, "OLMoE has experts in every layer"),
        ({"first_dense_layers": 1, "layer_interval": 2}, {"num_layers": 4, "qk_norm": "head"},
         "model.moe.layer_interval"),
        ({}, {"qk_norm": "head", "moe": None}, "model.qk_norm"),
    ):
        fields = {**base, **extra}
        if fields.get("moe", "x") is not None:
            fields["moe"] = MoEConfig(num_experts=4, **moe)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            hf_architecture(ModelConfig(**fields))
