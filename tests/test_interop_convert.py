"""`megalite convert --from-hf DIR --out DIR` through the CLI module's own parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch


def _parser() -> argparse.ArgumentParser:
    from megalite.commands import convert as convert_cli

    parser = argparse.ArgumentParser(prog="megalite convert")
    convert_cli.add_arguments(parser)
    return parser


def test_convert_from_hf_writes_loadable_weights(tmp_path: Path, capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megalite.commands import convert as convert_cli
    from megalite.interop.native import load_weights

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    hf.eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    args = _parser().parse_args(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert convert_cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()

    # model.json is a preset: a run file can name it as its model.
    import json

    from megalite.config import from_dict

    raw = json.loads((tmp_path / "out" / "model.json").read_text())
    from_dict({"model": raw, "deepspeed": {"train_micro_batch_size_per_gpu": 1},
               "data": {"prefixes": ["unused"], "seq_length": 32}})

    model = load_weights(tmp_path / "out")
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, gather_logits=True)[..., :200], hf(ids).logits, rtol=0, atol=1e-4)

    # A hand-edited model.json holding a key twice is refused, naming the key and both lines (json keeps the last).
    from megalite.errors import CheckpointError

    text = (tmp_path / "out" / "model.json").read_text()
    first = text.index("\n") + 1
    (tmp_path / "out" / "model.json").write_text(text[:first] + '  "num_layers": 7,\n' + text[first:])
    with pytest.raises(CheckpointError, match=r'model.json: duplicate key "num_layers" at lines 2 and \d+'):
        load_weights(tmp_path / "out")


def test_convert_errors_are_reported(tmp_path: Path, capsys) -> None:
    from megalite import cli

    # Bad input exits 2 (the README's exit-code table), with the reason on stderr.
    assert cli.main(["convert"]) == 2
    (tmp_path / "x").mkdir()
    assert cli.main(["convert", "--from-hf", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
