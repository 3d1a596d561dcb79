"""Hugging Face GPT-2 / Llama (and Mistral) and Mixtral / Qwen3-MoE / OLMoE import (`from_hf`) and export (`to_hf`),
at any TP degree.

Import reads `config.json` and safetensors (single file or sharded with an index) directly, maps the
tensors to megalite's canonical, TP-independent names (see `megalite.model.weights`), pads the
vocabulary to the model's multiple, and keeps this TP rank's shards. Export gathers the shards
(a collective over the TP group), strips the padding and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads, with the tokenizer when known.
transformers is imported only for export (to write its config classes).

Mixture-of-Experts families: experts in transformers 5 are fused in memory (`mlp.experts.gate_up_proj` (E, 2I, H),
gate rows first; `mlp.experts.down_proj` (E, H, I); router `mlp.gate.weight` (E, H)) and per expert on disk (Mixtral
`block_sparse_moe.experts.{e}.w1|w3|w2.weight` and `block_sparse_moe.gate.weight`, Qwen3-MoE and OLMoE
`mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`); import reads either, export writes the on-disk names. Qwen3-MoE
adds a per-head q/k RMSNorm (model.qk_norm='head'), OLMoE one over the whole q and k projections ('projection').
Their auxiliary load-balancing loss is a training setting computed over all layers together (megalite's is per
layer): import leaves model.moe.aux_loss at 0; set it when training.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megalite.config import ModelConfig, MoEConfig, ParallelConfig, RopeScalingConfig
from megalite.distributed import is_main
from megalite.errors import CheckpointError, ConfigError
from megalite.model import build_model
from megalite.model.weights import full_state_dict, load_full_state_dict

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json",
)
# Mistral is the Llama architecture (same tensor names) plus an optional sliding window, which megalite's
# attention does not have: imported when the window never applies, exported as Llama.
SUPPORTED = ("gpt2", "llama", "mistral", "mixtral", "qwen3_moe", "olmoe")
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ----------------------------------------------------------------------------- reading


def read_hf_config(path: Union[str, Path]) -> dict:
    """The `config.json` of a Hugging Face model directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from None


def _rope(hf: dict) -> tuple[float, Optional[RopeScalingConfig]]:
    """RoPE base and scaling from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"rope_parameters.rope_type={kind!r} is not supported (megalite implements plain, "
                              "linear and llama3 RoPE)")
    if params.get("attention_factor") not in (None, 1.0):
        raise CheckpointError(f"rope_parameters.attention_factor={params['attention_factor']!r} is not supported")
    keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    fields = {k: v for k, v in params.items() if k in keys}
    if "factor" not in fields:
        raise CheckpointError(f"rope_parameters: rope_type={kind!r} needs a `factor`")
    return theta, RopeScalingConfig(type=kind, **fields)


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128, **overrides: Any) -> ModelConfig:
    """The megalite ModelConfig of a Hugging Face GPT-2, Llama or Mistral config (dropout 0 unless overridden)."""
    kind = hf.get("model_type")
    archs = hf.get("architectures") or []
    if kind not in SUPPORTED:
        raise CheckpointError(
            f"unsupported architecture: model_type={kind!r} (architectures={archs}); megalite imports "
            f"{', '.join(SUPPORTED)}"
        )
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            raise CheckpointError(f"gpt2 activation_function={act!r} is not supported (megalite uses tanh GELU)")
        for key, want in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise CheckpointError(f"gpt2 {key}={hf[key]!r} is not supported")
        h = hf["n_embd"]
        cfg = dict(
            vocab_size=hf["vocab_size"], hidden_size=h, num_layers=hf["n_layer"], num_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * h, max_position_embeddings=hf["n_positions"],
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", position="learned",
            bias=True, tied_embeddings=True, init_std=hf.get("initializer_range", 0.02),
        )
    else:
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{kind} hidden_act={hf['hidden_act']!r} is not supported (megalite uses SwiGLU)")
        window, positions = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
        if window is not None and window < positions and hf.get("use_sliding_window", True):
            raise CheckpointError(
                f"{kind} sliding_window={window} < max_position_embeddings={positions}: megalite's attention has "
                "no sliding window, so this model cannot be represented exactly"
            )
        h, heads = hf["hidden_size"], hf["num_attention_heads"]
        theta, rope_scaling = _rope(hf)
        head_dim = hf.get("head_dim")  # a width other than hidden_size / heads (Qwen3-MoE-30B-A3B: 128 on 2048 / 32)
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)) and kind not in MOE_FAMILIES:
            raise CheckpointError(f"{kind} attention_bias != mlp_bias is not supported (megalite has one `bias` flag)")
        cfg = dict(
            vocab_size=hf["vocab_size"], hidden_size=h, num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope", rope_theta=theta,
            rope_scaling=rope_scaling,
            bias=bool(hf.get("attention_bias", False)), tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            attention_head_dim=None if head_dim is None or (h % heads == 0 and head_dim == h // heads) else head_dim,
        )
        if kind in MOE_FAMILIES:
            cfg.update(_moe_fields_from_hf(kind, hf))
    cfg.update(hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def _moe_fields_from_hf(kind: str, hf: dict) -> dict[str, Any]:
    """The ModelConfig fields of a Mixtral, Qwen3-MoE or OLMoE config beyond Llama's (CheckpointError, naming the key,
    for what megalite cannot represent exactly)."""
    layers = hf["num_hidden_layers"]
    fields: dict[str, Any] = {}
    # transformers names the count num_local_experts or num_experts by family and version (and maps one to the other).
    count = hf.get("num_local_experts", hf.get("num_experts"))
    if kind == "mixtral":
        if hf.get("router_jitter_noise", 0.0):
            raise CheckpointError(f"mixtral router_jitter_noise={hf['router_jitter_noise']} is not supported (megalite's "
                                  "router adds no noise)")
        experts, size, normalize, first_dense = count, hf["intermediate_size"], True, 0
        interval = 1
    elif kind == "qwen3_moe":
        experts, size = count, hf["moe_intermediate_size"]
        normalize, interval = bool(hf.get("norm_topk_prob", False)), int(hf.get("decoder_sparse_step", 1) or 1)
        dense = sorted(hf.get("mlp_only_layers") or [])
        first_dense = len(dense)
        if dense != list(range(first_dense)) or (first_dense and interval != 1):
            raise CheckpointError(f"qwen3_moe mlp_only_layers={dense} with decoder_sparse_step={interval} is not "
                                  "supported: megalite's dense layers are the first ones (model.moe.first_dense_layers), "
                                  "then every layer_interval-th")
        fields["qk_norm"] = "head"
        if bool(hf.get("attention_bias", False)) and first_dense:
            raise CheckpointError("qwen3_moe attention_bias=true with dense layers (mlp_only_layers) is not supported "
                                  "(megalite's `bias` flag would give their MLP biases too)")
    else:  # olmoe
        if hf.get("clip_qkv") is not None:
            raise CheckpointError(f"olmoe clip_qkv={hf['clip_qkv']} is not supported (megalite does not clamp q, k, v)")
        experts, size, normalize = count, hf["intermediate_size"], bool(hf.get("norm_topk_prob", False))
        first_dense, interval = 0, 1
        fields["qk_norm"] = "projection"
    if not experts:
        raise CheckpointError(f"{kind} has no experts (num_experts={experts}); import it as a dense model")
    fields["moe"] = MoEConfig(num_experts=experts, top_k=hf["num_experts_per_tok"], ffn_hidden_size=size,
                              first_dense_layers=first_dense, layer_interval=interval, normalize_top_k=normalize)
    if first_dense or interval > 1:
        fields["ffn_hidden_size"] = hf["intermediate_size"]  # the dense layers' MLP
    if first_dense + interval > layers:
        raise CheckpointError(f"{kind}: no layer has experts (mlp_only_layers / decoder_sparse_step)")
    return fields


class HFTensors(Mapping):
    """The tensors of a Hugging Face directory's safetensors (one file or index-sharded), read on access.

    Only names are read up front; each tensor is read from the memory-mapped file when looked up, so
    loading a large model keeps one tensor at a time in memory, not the whole checkpoint per rank.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.path.glob("*.bin")) or sorted(p.name for p in self.path.iterdir())
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json (found "
                                  f"{found}); re-save the model with save_pretrained(safe_serialization=True)")
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for name in files:
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path}: shard {name} listed in the index is missing")
            try:
                handle = safe_open(str(self.path / name), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{self.path / name}: unreadable safetensors file ({e})") from None
            self._files[name] = handle
            self._where.update(dict.fromkeys(handle.keys(), name))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_tensors(path: Union[str, Path]) -> HFTensors:
    """Every tensor of a Hugging Face directory's safetensors, as a mapping that reads on access."""
    return HFTensors(path)


# ----------------------------------------------------------------------------- name mapping


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    # Padding rows are never looked up (ids are checked) nor predicted (logits masked): zeros.
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _concat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts)


def _stack_experts(*ts: torch.Tensor) -> torch.Tensor:
    """Per-expert matrices -> (E, ...): (gate_e, up_e) pairs fused per expert when two matrices each are given."""
    return torch.stack(ts)


def _stack_gate_up(*ts: torch.Tensor) -> torch.Tensor:
    """gate_0, up_0, gate_1, up_1, ... -> (E, 2I, H), gate rows first in each expert (Hugging Face's fused layout)."""
    return torch.stack([torch.cat(ts[i:i + 2]) for i in range(0, len(ts), 2)])


class MappedState(Mapping):
    """megalite's canonical state dict over Hugging Face tensors, each built when looked up.

    A value is (function, source names): looking it up reads those tensors and applies the function,
    so a loader that takes one parameter at a time never holds the whole model.
    """

    def __init__(self, tensors: Mapping, recipes: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]]):
        self.tensors, self.recipes = tensors, recipes

    def __getitem__(self, name: str) -> torch.Tensor:
        fn, sources = self.recipes[name]
        return fn(*(self.tensors[s] for s in sources))

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the tensor
        return name in self.recipes

    def __iter__(self) -> Iterator[str]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)


class _Source:
    """Resolves a tensor's name among candidates, naming the missing tensor and the directory."""

    def __init__(self, tensors: Mapping, where: str, arch: str) -> None:
        self.tensors, self.where, self.arch = tensors, where, arch

    def __call__(self, *candidates: str) -> str:
        for name in candidates:
            if name in self.tensors:
                return name
        raise CheckpointError(f"{self.where}: tensor {candidates[0]!r} is missing from the {self.arch} checkpoint")


def hf_to_megalite_state(cfg: ModelConfig, tensors: Mapping, arch: str, where: str = "checkpoint") -> MappedState:
    """Map Hugging Face tensors to megalite's full, canonical state dict (built lazily, checked now)."""
    get = _Source(tensors, where, arch)
    vp = cfg.padded_vocab_size

    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        return _pad_rows(t, vp)

    s: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {}
    if arch == "gpt2":
        def g(name: str) -> str:
            return get(f"transformer.{name}", name)

        s["embedding.word.weight"] = (pad_vocab, (g("wte.weight"),))
        s["embedding.position.weight"] = (_same, (g("wpe.weight"),))
        for i in range(cfg.num_layers):
            p, m = f"h.{i}.", f"layers.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                s[m + ours + ".weight"] = (_same, (g(p + theirs + ".weight"),))
                s[m + ours + ".bias"] = (_same, (g(p + theirs + ".bias"),))
            # GPT-2's Conv1D stores (in, out): transpose to Linear's (out, in). c_attn's outputs are [q, k, v].
            for ours, theirs in (("attention.qkv", "attn.c_attn"), ("attention.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                s[m + ours + ".weight"] = (_transpose, (g(p + theirs + ".weight"),))
                s[m + ours + ".bias"] = (_same, (g(p + theirs + ".bias"),))
        s["final_norm.weight"] = (_same, (g("ln_f.weight"),))
        s["final_norm.bias"] = (_same, (g("ln_f.bias"),))
    else:
        s["embedding.word.weight"] = (pad_vocab, (get("model.embed_tokens.weight"),))
        for i in range(cfg.num_layers):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            s[m + "norm1.weight"] = (_same, (get(p + "input_layernorm.weight"),))
            s[m + "norm2.weight"] = (_same, (get(p + "post_attention_layernorm.weight"),))
            suffixes = ("weight", "bias") if cfg.bias else ("weight",)
            for w in suffixes:
                s[m + "attention.qkv." + w] = (_concat, tuple(get(p + f"self_attn.{x}_proj.{w}") for x in "qkv"))
                s[m + "attention.proj." + w] = (_same, (get(p + f"self_attn.o_proj.{w}"),))
                if cfg.is_moe_layer(i):
                    continue
                s[m + "mlp.fc." + w] = (_concat, tuple(get(p + f"mlp.{x}_proj.{w}") for x in ("gate", "up")))
                s[m + "mlp.proj." + w] = (_same, (get(p + f"mlp.down_proj.{w}"),))
            if cfg.qk_norm is not None:
                for x in "qk":
                    s[m + f"attention.{x}_norm.weight"] = (_same, (get(p + f"self_attn.{x}_norm.weight"),))
            if cfg.is_moe_layer(i):
                s.update(_hf_expert_recipes(cfg, arch, get, p, m))
        s["final_norm.weight"] = (_same, (get("model.norm.weight"),))
        if not cfg.tied_embeddings:
            s["output"] = (pad_vocab, (get("lm_head.weight"),))
    return MappedState(tensors, s)


# Per-expert names on disk: (router, gate, up, down) with {e} for the expert (Mixtral's w1/w3/w2).
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight"),
    "other": ("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
              "mlp.experts.{e}.down_proj.weight"),
}


def _hf_expert_recipes(cfg: ModelConfig, arch: str, get: _Source, p: str, m: str) -> dict:
    """The MoE layer's router and experts from the fused in-memory names or the per-expert names on disk."""
    router, gate, up, down = _EXPERT_NAMES["mixtral" if arch == "mixtral" else "other"]
    e = cfg.moe.num_experts
    out = {m + "mlp.router.weight": (_same, (get(p + "mlp.gate.weight", p + router),))}
    if p + "mlp.experts.gate_up_proj" in get.tensors:  # a model in memory (transformers 5 fuses its experts)
        out[m + "mlp.experts.w_in"] = (_same, (get(p + "mlp.experts.gate_up_proj"),))
        out[m + "mlp.experts.w_out"] = (_same, (get(p + "mlp.experts.down_proj"),))
        return out
    pairs = [get(p + name.format(e=j)) for j in range(e) for name in (gate, up)]
    out[m + "mlp.experts.w_in"] = (_stack_gate_up, tuple(pairs))
    out[m + "mlp.experts.w_out"] = (_stack_experts, tuple(get(p + down.format(e=j)) for j in range(e)))
    return out


def hf_architecture(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': the Hugging Face family that holds exactly this model; ConfigError otherwise."""
    c = cfg
    if (c.norm, c.mlp, c.position) == ("layernorm", "gelu", "learned") and c.bias and c.tied_embeddings \
            and c.kv_heads == c.num_heads:
        return "gpt2"
    if (c.norm, c.mlp, c.position) == ("rmsnorm", "swiglu", "rope") and c.moe is not None:
        return _hf_moe_architecture(c)
    if (c.norm, c.mlp, c.position) == ("rmsnorm", "swiglu", "rope"):
        if c.qk_norm is not None:
            raise ConfigError(f"model.qk_norm: {c.qk_norm!r} without model.moe has no Hugging Face family here "
                              "(megalite exports Llama without q/k norms)")
        return "llama"
    raise ConfigError(
        f"no Hugging Face architecture holds this model (norm={c.norm}, mlp={c.mlp}, position={c.position}, "
        f"bias={c.bias}, tied_embeddings={c.tied_embeddings}, kv_heads={c.kv_heads}); GPT-2 needs "
        "layernorm/gelu/learned/bias/tied/MHA, Llama needs rmsnorm/swiglu/rope"
    )


def _hf_moe_architecture(c: ModelConfig) -> str:
    """'mixtral', 'qwen3_moe' or 'olmoe' for an MoE model one of them holds exactly; ConfigError naming the key."""
    e = c.moe
    refuse = {"model.moe.shared_experts": e.shared_experts != 0, "model.moe.router": e.router != "softmax",
              "model.moe.expert_bias": e.expert_bias, "model.moe.routed_scaling": e.routed_scaling != 1.0,
              "model.moe.capacity_factor": e.capacity_factor is not None}
    for key, bad in refuse.items():
        if bad:
            raise ConfigError(f"{key}: {getattr(e, key.rsplit('.', 1)[1])!r} has no counterpart in Mixtral, Qwen3-MoE "
                              "or OLMoE (dropless softmax top-k routing without shared experts, bias or scaling)")
    all_moe = e.first_dense_layers == 0 and e.layer_interval == 1
    if c.qk_norm is None:
        if not all_moe or not e.normalize_top_k or c.bias:
            raise ConfigError("model.moe: Mixtral (no q/k norm) has experts in every layer, renormalised top-k "
                              f"weights and no biases; got first_dense_layers={e.first_dense_layers}, layer_interval="
                              f"{e.layer_interval}, normalize_top_k={e.normalize_top_k}, model.bias={c.bias}")
        return "mixtral"
    if c.qk_norm == "head":
        if e.first_dense_layers and e.layer_interval != 1:
            raise ConfigError(f"model.moe.layer_interval: {e.layer_interval} after first_dense_layers="
                              f"{e.first_dense_layers} has no Qwen3-MoE counterpart (its sparse step counts from "
                              "layer 0)")
        if c.bias and e.first_dense_layers:
            raise ConfigError("model.bias: Qwen3-MoE's dense layers have no MLP biases")
        return "qwen3_moe"
    if not all_moe:
        raise ConfigError(f"model.moe.first_dense_layers/layer_interval: OLMoE has experts in every layer, got "
                          f"{e.first_dense_layers}/{e.layer_interval}")
    return "olmoe"


def megalite_to_hf_state(cfg: ModelConfig, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map megalite's full state dict to Hugging Face tensor names (vocabulary padding stripped)."""
    arch = hf_architecture(cfg)
    v = cfg.vocab_size
    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        out["transformer.wte.weight"] = s["embedding.word.weight"][:v]
        out["transformer.wpe.weight"] = s["embedding.position.weight"]
        for i in range(cfg.num_layers):
            p, m = f"transformer.h.{i}.", f"layers.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[p + theirs + ".weight"] = s[m + ours + ".weight"]
                out[p + theirs + ".bias"] = s[m + ours + ".bias"]
            for ours, theirs in (("attention.qkv", "attn.c_attn"), ("attention.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[p + theirs + ".weight"] = s[m + ours + ".weight"].t()
                out[p + theirs + ".bias"] = s[m + ours + ".bias"]
        out["transformer.ln_f.weight"] = s["final_norm.weight"]
        out["transformer.ln_f.bias"] = s["final_norm.bias"]
    else:
        q, kv, f = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_size
        out["model.embed_tokens.weight"] = s["embedding.word.weight"][:v]
        for i in range(cfg.num_layers):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            out[p + "input_layernorm.weight"] = s[m + "norm1.weight"]
            out[p + "post_attention_layernorm.weight"] = s[m + "norm2.weight"]
            for w in ("weight", "bias") if cfg.bias else ("weight",):
                for x, t in zip("qkv", s[m + "attention.qkv." + w].split([q, kv, kv])):
                    out[p + f"self_attn.{x}_proj.{w}"] = t
                out[p + f"self_attn.o_proj.{w}"] = s[m + "attention.proj." + w]
                if cfg.is_moe_layer(i):
                    continue
                gate, up = s[m + "mlp.fc." + w].split([f, f])
                out[p + f"mlp.gate_proj.{w}"], out[p + f"mlp.up_proj.{w}"] = gate, up
                out[p + f"mlp.down_proj.{w}"] = s[m + "mlp.proj." + w]
            if cfg.qk_norm is not None:
                for x in "qk":
                    out[p + f"self_attn.{x}_norm.weight"] = s[m + f"attention.{x}_norm.weight"]
            if cfg.is_moe_layer(i):
                router, gate_name, up_name, down_name = _EXPERT_NAMES["mixtral" if arch == "mixtral" else "other"]
                out[p + router] = s[m + "mlp.router.weight"]
                size = cfg.expert_ffn_size
                for j, (w_in, w_out) in enumerate(zip(s[m + "mlp.experts.w_in"], s[m + "mlp.experts.w_out"])):
                    out[p + gate_name.format(e=j)], out[p + up_name.format(e=j)] = w_in.split([size, size])
                    out[p + down_name.format(e=j)] = w_out
        out["model.norm.weight"] = s["final_norm.weight"]
        if not cfg.tied_embeddings:
            out["lm_head.weight"] = s["output"][:v]
    # safetensors refuses shared or strided storage.
    return {k: t.detach().contiguous().clone() for k, t in out.items()}


def hf_config_dict(cfg: ModelConfig, base: Optional[dict] = None) -> Any:
    """A transformers config object for `cfg` (token ids and extras carried over from `base`)."""
    import transformers

    base = base or {}
    keep = {k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base}
    arch = hf_architecture(cfg)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=None if cfg.ffn_size == 4 * cfg.hidden_size else cfg.ffn_size,
            activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout, initializer_range=cfg.init_std,
            tie_word_embeddings=True, architectures=["GPT2LMHeadModel"], **keep,
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        rope.update(rope_type=r.type, factor=r.factor)
        if r.type == "llama3":
            rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                        original_max_position_embeddings=r.original_max_position_embeddings)
    if arch in MOE_FAMILIES:
        return _hf_moe_config(cfg, arch, rope, keep)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        hidden_act="silu", attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.tied_embeddings, initializer_range=cfg.init_std, rope_parameters=rope,
        rope_theta=cfg.rope_theta, architectures=["LlamaForCausalLM"], **keep,
    )


def _hf_moe_config(cfg: ModelConfig, arch: str, rope: dict, keep: dict) -> Any:
    """The transformers config of a Mixtral, Qwen3-MoE or OLMoE model."""
    import transformers

    e = cfg.moe
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        attention_dropout=cfg.attention_dropout, tie_word_embeddings=cfg.tied_embeddings,
        initializer_range=cfg.init_std, rope_parameters=rope, num_experts_per_tok=e.top_k,
        output_router_logits=False, **keep,
    )
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=cfg.expert_ffn_size, head_dim=cfg.head_dim,
                                          num_local_experts=e.num_experts, sliding_window=None,
                                          architectures=["MixtralForCausalLM"])
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=cfg.ffn_size, moe_intermediate_size=cfg.expert_ffn_size,
            head_dim=cfg.head_dim, num_experts=e.num_experts, norm_topk_prob=e.normalize_top_k,
            decoder_sparse_step=e.layer_interval, mlp_only_layers=list(range(e.first_dense_layers)),
            attention_bias=cfg.bias, use_sliding_window=False, architectures=["Qwen3MoeForCausalLM"])
    return transformers.OlmoeConfig(**common, intermediate_size=cfg.expert_ffn_size, num_experts=e.num_experts,
                                    norm_topk_prob=e.normalize_top_k, attention_bias=cfg.bias, clip_qkv=None,
                                    architectures=["OlmoeForCausalLM"])


# ----------------------------------------------------------------------------- public API


def load_hf_state(path: Union[str, Path], make_vocab_size_divisible_by: int = 128,
                  **overrides: Any) -> tuple[ModelConfig, MappedState]:
    """The ModelConfig and full canonical state dict of a Hugging Face directory, read tensor by tensor as it
    is looked up (for pipeline stages: `megalite.model.pipeline.load_pipeline_state(module, state, grid)`)."""
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, make_vocab_size_divisible_by, **overrides)
    return cfg, hf_to_megalite_state(cfg, load_hf_tensors(path), hf["model_type"], str(path))


def from_hf(
    path_or_model: Union[str, Path, Any],
    grid: Any = None,
    parallel_cfg: Optional[ParallelConfig] = None,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 1234,
    **overrides: Any,
) -> torch.nn.Module:
    """A megalite model holding this TP rank's shards of a Hugging Face GPT-2/Llama/Mistral directory or model.

    `overrides` set ModelConfig fields the checkpoint does not fix (hidden_dropout, activation_checkpointing).
    The model remembers its source (`model.hf_source`) so `to_hf` can carry the tokenizer and token ids.
    """
    if isinstance(path_or_model, (str, Path)):
        hf = read_hf_config(path_or_model)
        cfg, state = load_hf_state(path_or_model, make_vocab_size_divisible_by, **overrides)
        source_dir: Optional[str] = str(path_or_model)
    else:  # a transformers PreTrainedModel
        hf = path_or_model.config.to_dict()
        cfg = model_config_from_hf(hf, make_vocab_size_divisible_by, **overrides)
        state = hf_to_megalite_state(cfg, path_or_model.state_dict(), hf["model_type"],
                                     type(path_or_model).__name__)
        source_dir = getattr(path_or_model.config, "_name_or_path", None) or None
    if parallel_cfg is None:
        parallel_cfg = ParallelConfig(tensor=grid.get_tensor_model_parallel_world_size() if grid is not None else 1)
    model = build_model(cfg, parallel_cfg, grid, seed=seed, device=device, dtype=dtype)
    load_full_state_dict(model, state, model.group)
    model.hf_source = {"path": source_dir, "config": hf}
    return model


def to_hf(
    model: torch.nn.Module,
    out_dir: Union[str, Path],
    tokenizer_dir: Optional[Union[str, Path]] = None,
    write: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Path]:
    """Write `model` as a Hugging Face directory; every TP rank must call it (it gathers the shards).

    `write` defaults to global rank 0 only. Returns the directory on the writing rank, else None.
    """
    cfg: ModelConfig = model.config
    hf_architecture(cfg)  # refuse before any collective
    state = gathered_state(model, write)
    if state is None:
        return None
    source = getattr(model, "hf_source", None) or {}
    tensors = megalite_to_hf_state(cfg, state)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = hf_config_dict(cfg, source.get("config"))
    hf_config.torch_dtype = dtype or next(iter(tensors.values())).dtype
    hf_config.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(tokenizer_dir or source.get("path"), out)
    return out


def gathered_state(model: torch.nn.Module, write: Optional[bool] = None) -> Optional[dict[str, torch.Tensor]]:
    """The model's full state dict on the writing rank (default: global rank 0), None on the others.

    Every TP rank must call it: the shards are all-gathered over the model's TP group.
    """
    state = full_state_dict(model, model.group)
    return state if (is_main() if write is None else write) else None


def copy_tokenizer(source_dir: Optional[Union[str, Path]], out: Path) -> None:
    """Copy the tokenizer files of `source_dir` (a model or tokenizer directory) into `out`, if any."""
    tok = Path(source_dir) if source_dir else None
    if tok is None or not tok.is_dir() or tok.resolve() == out.resolve():
        return
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy2(tok / name, out / name)
