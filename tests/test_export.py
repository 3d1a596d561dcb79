"""Checkpoints of every layout -> one set of weights: convert to Hugging Face, DeepSpeed's zero_to_fp32,
evaluation, and generation with and without the KV cache at TP1 and TP2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megalite import config as C
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import init_from_report, tiny_config, write_token_dataset

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
# The GPT family (tiny_config's defaults: LayerNorm, GELU, learned positions, biases, tied), for generation.
GPT_RUN = "gpt_tp2_zero1"


def _train_layouts(workdir: str) -> None:
    from megalite.engine.trainer import Trainer

    raw = tiny_config(f"{workdir}/tok", f"{workdir}/{GPT_RUN}", train={"steps": STEPS}, parallel={"tensor": 2},
                      deepspeed={"zero_optimization": {"stage": 1}})
    if Trainer(C.from_dict(raw)).train() != 0:
        raise RuntimeError(f"{GPT_RUN}: failed")
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
    """For every layout: the exported Hugging Face model's logits equal megalite's own logits for the same
    checkpoint (fp32, 1e-5), and the exported tensors are exactly the merged shards (renamed, padding stripped)."""
    from safetensors.torch import load_file

    from megalite.checkpoint.consolidate import load_full_weights, model_from_checkpoint
    from megalite.interop.export import export_hf
    from megalite.interop.hf import megalite_to_hf_state

    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name in LAYOUTS:
        out = export_hf(f"{trained}/{name}", tmp_path / name)
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        logits[name] = _hf_logits(out, ids)
        assert logits[name].shape == (2, 11, 97), "vocabulary padding must be stripped"
        cfg, model, _ = model_from_checkpoint(f"{trained}/{name}")
        with torch.no_grad():
            ours = model(ids, gather_logits=True)[..., :97]
        torch.testing.assert_close(logits[name], ours, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: exported vs megalite logits: {m}")
        _, state, _ = load_full_weights(f"{trained}/{name}")
        expected, exported = megalite_to_hf_state(cfg.model, state), load_file(str(out / "model.safetensors"))
        assert set(expected) == set(exported), name
        for key, tensor in expected.items():
            assert torch.equal(exported[key], tensor), (name, key)
    for name in LAYOUTS:  # and the layouts agree with each other (the same training, other shardings)
        torch.testing.assert_close(logits[name], logits["tp1_zero2"], atol=2e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name} vs tp1_zero2: {m}")
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
    from megalite.generate import generate_ids
    from megalite.launch import init_distributed
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


def _write_word_tokenizer(run_dir: Path) -> None:
    """The test vocabulary as words "t0" .. "t96" (t0 is the data's end of document), as the run's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(run_dir / "tokenizer.json"))


def _words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """The GPT run and the TP2 x PP2 Llama run with a tokenizer, exported by `megalite convert --to-hf`."""
    from megalite.cli import main

    out = {}
    for run in (GPT_RUN, "tp2_pp2"):
        _write_word_tokenizer(Path(trained) / run)
        out[run] = tmp_path_factory.mktemp("hf") / run
        assert main(["convert", "--checkpoint", f"{trained}/{run}", "--to-hf", str(out[run])]) == 0
    return out


def _plain_cross_entropy(hf_dir: Path, windows: torch.Tensor) -> tuple[float, float, int]:
    """(mean loss, accuracy, tokens) of a transformers model predicting each window's tokens from the ones before:
    windows (N, seq + 1) hold inputs [:-1] and labels [1:]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits.double()
    labels = windows[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             reduction="sum").item()
    correct = int((logits.argmax(-1) == labels).sum())
    return loss / labels.numel(), correct / labels.numel(), labels.numel()


def test_eval_and_generate_cli(trained, exported):
    """`megalite eval` against a plain cross-entropy of the exported model over the validation documents, packed
    by hand (laid end to end in the run's document order, windows of seq_length + 1 sharing one token)."""
    from megalite.checkpoint.consolidate import model_from_checkpoint
    from megalite.data import IndexedDataset, build_datasets
    from megalite.evaluate import evaluate_model

    out = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", f"{trained}/tp2_pp2",
                          "--split", "valid"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    prefix, seq = f"{trained}/tok", 16  # tiny_config: split 90,10,0, seq_length 16, seed 7
    documents = IndexedDataset(prefix)
    first_valid = round(0.9 * len(documents))
    cfg, model, _ = model_from_checkpoint(f"{trained}/tp2_pp2")
    _, valid, _ = build_datasets([prefix], None, "90,10,0", seq, 7, cache_dir=cfg.data.cache_dir)
    order = [int(d) for d in valid.doc_idx]  # the sampler's shuffle of the documents (one epoch)
    assert sorted(order) == list(range(first_valid, len(documents)))
    stream = torch.from_numpy(np.concatenate([np.asarray(documents[d], dtype=np.int64) for d in order]))
    windows = torch.stack([stream[j * seq: j * seq + seq + 1] for j in range((len(stream) - 1) // seq)])
    loss, accuracy, tokens = _plain_cross_entropy(exported["tp2_pp2"], windows)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # The library: another batch size (one short batch), and max_samples (the first samples of the shuffle).
    again = evaluate_model(model, valid, batch_size=3)
    assert again["loss"] == pytest.approx(loss, rel=1e-5) and again["accuracy"] == result["accuracy"]
    first_two = evaluate_model(model, valid, batch_size=8, max_samples=2)
    loss2, accuracy2, tokens2 = _plain_cross_entropy(exported["tp2_pp2"], windows[np.array(valid.shuffle_idx[:2])])
    assert first_two["tokens"] == tokens2 == 2 * seq
    assert first_two["loss"] == pytest.approx(loss2, rel=1e-5) and first_two["accuracy"] == pytest.approx(accuracy2)
    bad = subprocess.run([sys.executable, "-m", "megalite.cli", "eval", "--checkpoint", f"{trained}/nowhere"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "not a megalite checkpoint" in bad.stderr


def _cli_generate(capsys, *args: str) -> tuple[int, str, str]:
    from megalite.cli import main

    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("run", [GPT_RUN, "tp2_pp2"])
def test_greedy_generate_cli_equals_transformers(trained, exported, run, capsys, caplog):
    """Greedy `megalite generate` (GPT family; Llama family from TP2 x PP2 shards) against transformers'
    generate(do_sample=False) on the model `megalite convert --to-hf` exported: the same tokens, with both
    stopping at the end-of-document token (the exported eos) or both running to the length asked."""
    import transformers

    from megalite.checkpoint.consolidate import model_from_checkpoint
    from megalite.generate import generate_ids

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported[run]), dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == 0  # the data's end of document
    checkpoint, prompt, n = f"{trained}/{run}", [5, 9, 13, 17, 21], 12
    ids = torch.tensor([prompt])
    greedy = ["--checkpoint", checkpoint, "--prompt", _words(prompt), "--max-new-tokens", str(n), "--temperature", "0"]
    code, out, err = _cli_generate(capsys, *greedy)
    assert code == 0, err
    theirs = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()
    assert out == _words(theirs) + "\n"
    code, out, err = _cli_generate(capsys, *greedy, "--ignore-eod")
    assert code == 0, err
    full = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)[0].tolist()
    assert len(full) == len(prompt) + n and out == _words(full) + "\n"
    # Stopping at an eos, checked where it happens: make the third new token the eos of both (they stop at its
    # first appearance).
    _, model, _ = model_from_checkpoint(checkpoint)
    eos = full[len(prompt) + 2]
    stopped = generate_ids(model, ids, n, eos_id=eos)[0].tolist()
    assert stopped == full[: full.index(eos, len(prompt)) + 1]
    assert stopped == hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)[0].tolist()
    # The context (max_position_embeddings 32): a prompt that fills it is refused; one that leaves 4 tokens
    # gets 4, with a warning.
    code, out, err = _cli_generate(capsys, "--checkpoint", checkpoint, "--prompt", _words(list(range(1, 33))))
    assert code == 2 and out == "" and "the prompt is 32 tokens" in err and "is 32" in err, err
    with caplog.at_level("WARNING", logger="megalite.generate"):
        code, out, err = _cli_generate(capsys, "--checkpoint", checkpoint, "--prompt", _words(list(range(1, 29))),
                                       "--max-new-tokens", "10", "--ignore-eod")
    assert code == 0 and len(out.split()) == 32, err
    assert "at most 4 new tokens, not 10" in caplog.text


def test_command_stdout_is_the_result_alone(trained):
    """`megalite generate` prints the text and `megalite eval` one JSON object, nothing else, to stdout; library
    logs (DeepSpeed's among them) go to stderr, so a pipe or a redirect gets the result only."""
    from megalite.generate import generate_text

    run_dir = Path(trained) / "tp2_pp2"
    _write_word_tokenizer(run_dir)
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
