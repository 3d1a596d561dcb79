"""Hugging Face import/export parity: GPT-2 and Llama with grouped-query attention and untied embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megalite.memory import peak_anon_growth
from tests.helpers.distributed import run_ranks

VOCAB = 300


def _perturb(model: torch.nn.Module) -> None:
    # transformers initialises norms to ones and biases to zeros: perturb so every mapping is exercised.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=1)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                              max_position_embeddings=64, tie_word_embeddings=False,
                                              rope_theta=5000.0, rms_norm_eps=1e-6)),
    }
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    out = {"ids": ids}
    for name, m in models.items():
        _perturb(m)
        m.eval()
        m.save_pretrained(str(root / name))
        with torch.no_grad():
            out[name] = (root / name, m(ids).logits)
    _save_tokenizer(root / "gpt2")
    return out


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path))
    m.eval()
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_hf_to_hf_parity_tp1(arch: str, hf_dirs: dict, tmp_path: Path) -> None:
    from megalite.interop import from_hf, to_hf

    path, expected = hf_dirs[arch]
    ids = hf_dirs["ids"]
    model = from_hf(path)
    model.eval()
    assert model.config.tied_embeddings == (arch == "gpt2")
    assert model.config.kv_heads == (4 if arch == "gpt2" else 2)
    with torch.no_grad():
        logits = model(ids, gather_logits=True)
    assert logits.shape[-1] == 384  # padded to a multiple of 128
    torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=0, atol=1e-4)

    out = to_hf(model, tmp_path / "export")
    torch.testing.assert_close(_hf_logits(out, ids), expected, rtol=0, atol=1e-4)
    if arch == "gpt2":  # the tokenizer travels with the weights, and the token ids with the config
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(str(out))("w5 w7")["input_ids"] == [5, 7]
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == 1


def test_from_hf_model_object(hf_dirs: dict) -> None:
    from transformers import AutoModelForCausalLM

    from megalite.interop import from_hf

    path, expected = hf_dirs["llama"]
    model = from_hf(AutoModelForCausalLM.from_pretrained(str(path)))
    with torch.no_grad():
        torch.testing.assert_close(model(hf_dirs["ids"], gather_logits=True)[..., :VOCAB], expected, rtol=0,
                                   atol=1e-4)


def _tp2(paths: list[str], ids: torch.Tensor, expected: list[torch.Tensor], out_root: str) -> list[str]:
    from megalite.interop import from_hf, to_hf
    from megalite.parallel import ProcessGrid
    from tests.test_parallel_layers import no_shm_comm

    no_shm_comm()
    grid = ProcessGrid(tensor=2)
    written = []
    for path, exp in zip(paths, expected):
        model = from_hf(path, grid)
        assert model.embedding.word.weight.shape[0] == 384 // 2
        with torch.no_grad():
            logits = model(ids, gather_logits=True)
        torch.testing.assert_close(logits[..., :VOCAB], exp, rtol=0, atol=1e-4)
        out = to_hf(model, f"{out_root}/{Path(path).name}")
        written.append(str(out) if out else "")
    return written


def test_from_hf_to_hf_parity_tp2(hf_dirs: dict, tmp_path: Path) -> None:
    paths = [str(hf_dirs[a][0]) for a in ("gpt2", "llama")]
    expected = [hf_dirs[a][1] for a in ("gpt2", "llama")]
    results = run_ranks(_tp2, 2, paths, hf_dirs["ids"], expected, str(tmp_path))
    assert results[1] == ["", ""]  # only rank 0 writes
    for out, exp in zip(results[0], expected):
        torch.testing.assert_close(_hf_logits(Path(out), hf_dirs["ids"]), exp, rtol=0, atol=1e-4)


def test_unsupported_architecture_and_missing_tensor(hf_dirs: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from megalite.errors import CheckpointError, ConfigError
    from megalite.interop import from_hf, to_hf
    from megalite.interop.hf import hf_architecture

    path, _ = hf_dirs["llama"]
    bad = tmp_path / "bert"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="bert"):
        from_hf(bad)

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        from_hf(missing)

    scaled = tmp_path / "scaled"
    shutil.copytree(path, scaled)
    (scaled / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "dynamic",
                                                                              "rope_theta": 5e5}}))
    with pytest.raises(CheckpointError, match="dynamic"):
        from_hf(scaled)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(empty)

    from megalite.config import ModelConfig
    from megalite.model import build_model

    odd = ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, norm="rmsnorm", mlp="gelu")
    with pytest.raises(ConfigError, match="no Hugging Face architecture"):
        hf_architecture(odd)
    with pytest.raises(ConfigError):
        to_hf(build_model(odd), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_sharded_bf16_import_reads_one_tensor_at_a_time(tmp_path: Path) -> None:
    """A large checkpoint must not be held whole per rank: import reads tensors as it loads them.

    Eager loading holds the checkpoint (bf16) plus its fp32 copy, about 3x the file; reading one tensor
    at a time peaks at a few of the largest tensors.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megalite.interop.hf import HFTensors, load_hf_state
    from megalite.model import build_model, load_full_state_dict

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=12,
                                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                      max_position_embeddings=64))
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="4MB")
    assert (tmp_path / "model.safetensors.index.json").is_file(), "the checkpoint must be index-sharded"
    file_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert len(HFTensors(tmp_path)) == len(hf.state_dict())

    cfg, state = load_hf_state(tmp_path, make_vocab_size_divisible_by=8)
    model = build_model(cfg)
    reads: list[str] = []
    read = HFTensors.__getitem__

    def counted(self: HFTensors, name: str) -> torch.Tensor:
        reads.append(name)
        return read(self, name)

    HFTensors.__getitem__ = counted  # type: ignore[method-assign]
    try:
        growth, _ = peak_anon_growth(lambda: load_full_state_dict(model, state))
    finally:
        HFTensors.__getitem__ = read  # type: ignore[method-assign]
    assert sorted(reads) == sorted(hf.state_dict()), "every tensor read exactly once (membership reads nothing)"
    assert growth < file_bytes / 3, f"import grew anonymous memory by {growth} bytes for a {file_bytes}-byte file"
    ours = dict(model.named_parameters())
    theirs = hf.state_dict()
    q = theirs["model.layers.11.self_attn.q_proj.weight"].float()
    torch.testing.assert_close(ours["layers.11.attention.qkv.weight"][: q.shape[0]].detach(), q, rtol=0, atol=0)
    torch.testing.assert_close(ours["output"][:1000].detach(), theirs["lm_head.weight"].float(), rtol=0, atol=0)


@pytest.mark.parametrize("old_style", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 3.0},
], ids=["llama3", "linear"])
def test_rope_scaling_matches_transformers(rope: dict, old_style: bool, tmp_path: Path) -> None:
    """Llama 3.1-style and linear RoPE scaling, read from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys, give transformers' logits past the original context, and export."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from megalite.interop import from_hf, to_hf
    from megalite.model.transformer import rope_frequencies

    torch.manual_seed(5)
    # head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4 positions, so with original 64 the llama3 rule keeps
    # the first frequency, blends the next two and stretches the rest.
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, rope_parameters={"rope_theta": 1e4, **rope}))
    _perturb(hf)
    hf.eval()
    hf.save_pretrained(str(tmp_path / "in"))
    if old_style:
        cfg_file = tmp_path / "in" / "config.json"
        raw = json.loads(cfg_file.read_text())
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = {"type" if rope["rope_type"] == "linear" else "rope_type": params.pop("rope_type"),
                               **params}
        cfg_file.write_text(json.dumps(raw))
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits

    model = from_hf(tmp_path / "in")
    model.eval()
    scaling = model.config.rope_scaling
    assert scaling is not None and scaling.type == rope["rope_type"] and scaling.factor == rope["factor"]
    plain = rope_frequencies(dataclasses.replace(model.config, rope_scaling=None))
    assert not torch.allclose(rope_frequencies(model.config), plain), "the scaling must change the frequencies"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, gather_logits=True)[..., :VOCAB], expected, rtol=0, atol=1e-4)
    out = to_hf(model, tmp_path / "out")
    torch.testing.assert_close(_hf_logits(out, ids), expected, rtol=0, atol=1e-4)


def test_unsupported_rope_scaling_is_named(hf_dirs: dict, tmp_path: Path) -> None:
    from megalite.errors import CheckpointError, ConfigError
    from megalite.interop import from_hf

    path, _ = hf_dirs["llama"]
    for params, fragment in (({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
                             ({"rope_type": "linear"}, "needs a `factor`"),
                             ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
                              "low_freq_factor < high_freq_factor")):
        d = tmp_path / params["rope_type"]
        shutil.copytree(path, d, dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_theta": 5e5, **params}}))
        with pytest.raises((CheckpointError, ConfigError), match=fragment):
            from_hf(d)


def test_mistral_imports_as_llama_unless_its_window_applies(tmp_path: Path) -> None:
    """Mistral without an effective sliding window is the Llama architecture: same logits, exported as Llama;
    a window shorter than the context is refused by name (megalite's attention has none)."""
    from transformers import MistralConfig, MistralForCausalLM

    from megalite.errors import CheckpointError
    from megalite.interop import from_hf, to_hf

    torch.manual_seed(6)
    for window in (None, 64):  # 64 = max_position_embeddings: never applies
        hf = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, sliding_window=window))
        _perturb(hf)
        hf.eval()
        hf.save_pretrained(str(tmp_path / f"w{window}"))
        ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            expected = hf(ids).logits
            model = from_hf(tmp_path / f"w{window}")
            model.eval()
            torch.testing.assert_close(model(ids, gather_logits=True)[..., :VOCAB], expected, rtol=0, atol=1e-4)
        out = to_hf(model, tmp_path / f"out{window}")
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        torch.testing.assert_close(_hf_logits(out, ids), expected, rtol=0, atol=1e-4)
    windowed = tmp_path / "w64"
    cfg = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    with pytest.raises(CheckpointError, match=r"mistral sliding_window=16 < max_position_embeddings=64"):
        from_hf(windowed)
