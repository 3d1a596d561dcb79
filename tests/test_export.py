"""Checkpoints of every layout -> one set of weights: convert to Hugging Face, DeepSpeed's zero_to_fp32,
evaluation, and generation with and without the KV cache at TP1 and TP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite import config as C
from tests.distributed import run_ranks
from tests.engine_utils import init_from_report, tiny_config, write_token_dataset

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
# Five layouts over 4 ranks with the same global batch (4) and sample stream, so the same weights.
LAYOUTS = {
    "tp1_zero2": {"deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}},
    "tp1_zero3": {"deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}},
    "tp2_zero1": {"parallel": {"tensor": 2}, "deepspeed": {"zero_optimization": {"stage": 1}}},
    "tp2_zero3": {"parallel": {"tensor": 2}, "deepspeed": {"zero_optimization": {"stage": 3}}},
    "tp2_pp2": {"parallel": {"tensor": 2, "pipeline": 2},
                "deepspeed": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                              "zero_optimization": {"stage": 1}}},
}


# A Llama with GQA, untied.
LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
         "tied_embeddings": False}


def _train_layouts(workdir: str) -> None:
    from megalite.engine.trainer import Trainer

    for name, sections in LAYOUTS.items():  # pipeline last: DeepSpeed cannot build a plain engine after one
        raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name}", train={"steps": STEPS}, **sections)
        raw["model"].update(LLAMA)
        code = Trainer(C.from_dict(raw)).train()
        if code != 0:
            raise RuntimeError(f"{name}: exit {code}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("export")
    write_token_dataset(str(d / "tok"))
    run_ranks(_train_layouts, 4, str(d), timeout_s=500, collective_timeout_s=90)
    return str(d)


def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_convert_any_layout_gives_the_same_hf_model(trained, tmp_path):
    from megalite.checkpoint.consolidate import load_full_weights
    from megalite.interop.export import export_hf

    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name in LAYOUTS:
        out = export_hf(f"{trained}/{name}", tmp_path / name)
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        logits[name] = _hf_logits(out, ids)
        assert logits[name].shape == (2, 11, 97), "vocabulary padding must be stripped"
    for name in LAYOUTS:
        torch.testing.assert_close(logits[name], logits["tp1_zero2"], atol=2e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name} vs tp1_zero2: {m}")
    # The exported weights are the checkpoint's own: compare with our merge of the shards directly.
    _, state, manifest = load_full_weights(f"{trained}/tp2_pp2")
    assert manifest["layout"]["tensor"] == 2 and manifest["layout"]["pipeline"] == 2
    assert state["output"].shape == (100, 32)  # padded vocabulary, full (unsharded) rows


def test_deepspeed_zero_to_fp32_recovers_the_exported_weights(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megalite.checkpoint import resolve_checkpoint
    from megalite.checkpoint.consolidate import load_full_weights

    for name in ("tp1_zero2", "tp1_zero3"):
        step_dir = resolve_checkpoint(f"{trained}/{name}")
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds")
        _, ours, _ = load_full_weights(step_dir)
        assert set(theirs) == set(ours), name
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k].float(), atol=1e-6, rtol=1e-6,
                                       msg=lambda m, k=k, name=name: f"{name} {k}: {m}")


def _generate_tp2(checkpoint: str, prompt: list[int], n: int, trained: str) -> dict:
    from megalite.checkpoint.consolidate import load_full_weights, model_from_checkpoint
    from megalite.engine.launch import init_distributed
    from megalite.generate import generate_ids
    from megalite.parallel import ProcessGrid

    init_distributed()
    grid = ProcessGrid(tensor=2, pipeline=1)
    _, model, _ = model_from_checkpoint(checkpoint, grid)
    ids = torch.tensor([prompt])
    out = {"cached": generate_ids(model, ids, n).tolist(),
           "uncached": generate_ids(model, ids, n, use_cache=False).tolist()}
    # train.init_from a megalite checkpoint of another layout: TP2xPP2 weights into TP2 x DP1, ZeRO-3 (DP4)
    # weights into TP1 x DP2; the optimizer starts fresh, the weights are the checkpoint's.
    for source, parallel in (("tp2_pp2", {"tensor": 2}), ("tp1_zero3", {"tensor": 1})):
        raw = tiny_config(f"{trained}/tok", f"{trained}/init-{source}", parallel=parallel,
                          train={"init_from": f"{trained}/{source}", "steps": 1},
                          deepspeed={"zero_optimization": {"stage": 1}})
        raw["model"].update(LLAMA)
        _, theirs, _ = load_full_weights(f"{trained}/{source}")
        report = init_from_report(raw, theirs)
        out[f"init_{source}"] = (report["keys_equal"], report["max_diff"])
        out["mismatch"] = report["mismatch"]
    return out


def test_greedy_generation_cache_tp_and_transformers_agree(trained, tmp_path):
    import transformers

    from megalite.checkpoint.consolidate import model_from_checkpoint
    from megalite.generate import generate_ids
    from megalite.interop.export import export_hf

    checkpoint = f"{trained}/tp2_zero1"
    prompt, n = [5, 9, 13, 17, 21], 12
    _, model, _ = model_from_checkpoint(checkpoint)
    ids = torch.tensor([prompt])
    cached = generate_ids(model, ids, n)
    uncached = generate_ids(model, ids, n, use_cache=False)
    assert cached.shape == (1, len(prompt) + n)
    assert cached.tolist() == uncached.tolist()
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    reference = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert cached.tolist() == reference.tolist()
    tp2 = run_ranks(_generate_tp2, 2, checkpoint, prompt, n, trained, timeout_s=300)
    for rank_result in tp2:
        assert rank_result["cached"] == cached.tolist() == rank_result["uncached"]
        for source in ("tp2_pp2", "tp1_zero3"):
            same_keys, diff = rank_result[f"init_{source}"]
            assert same_keys and diff == 0.0, (source, diff)
        assert "train.init_from" in rank_result["mismatch"] and "hidden_size" in rank_result["mismatch"]


def test_eval_and_generate_cli(trained):
    out = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", f"{trained}/tp2_pp2",
                          "--split", "valid"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"loss", "perplexity", "accuracy", "tokens"}
    assert result["tokens"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert abs(result["perplexity"] - torch.tensor(result["loss"]).exp().item()) < 1e-3 * result["perplexity"]
    bad = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", f"{trained}/nowhere"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "not a megalite checkpoint" in bad.stderr


def test_command_stdout_is_the_result_alone(trained):
    """`megalite generate` prints the text and `megalite eval` one JSON object, nothing else, to stdout; library
    logs (DeepSpeed's among them) go to stderr, so a pipe or a redirect gets the result only."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megalite.generate import generate_text

    run_dir = Path(trained) / "tp2_pp2"
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(run_dir / "tokenizer.json"))
    expected = generate_text(str(run_dir), "t5 t6 t7", max_new_tokens=6, temperature=0.0)
    assert expected.startswith("t5 t6 t7") and len(expected.split()) == 9
    # Without DS_ACCELERATOR DeepSpeed logs "Setting accelerator to CPU" through its stdout logger at import.
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    gen = subprocess.run([sys.executable, "-m", "megalite.cli", "generate", "--checkpoint", str(run_dir), "--prompt",
                          "t5 t6 t7", "--max-new-tokens", "6", "--temperature", "0"], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=env)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout == expected + "\n", (gen.stdout, gen.stderr[-1000:])
    ev = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", str(run_dir)],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.stdout.count("\n") == 1 and set(json.loads(ev.stdout)) >= {"loss", "perplexity", "accuracy"}
