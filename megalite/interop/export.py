"""Export a megalite checkpoint of any layout as a Hugging Face directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from megalite.checkpoint.consolidate import find_tokenizer, model_from_checkpoint
from megalite.config import Config
from megalite.data.prepare import read_manifest
from megalite.errors import CheckpointError
from megalite.interop.hf import to_hf


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a checkpoint of any layout as a Hugging Face directory: merged fp32 weights in safetensors,
    vocabulary padding stripped, the run's tokenizer with its end-of-document token as eos."""
    cfg, model, step_dir = model_from_checkpoint(path)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tok_dir:
        try:
            tokenizer_file = find_tokenizer(step_dir, cfg)
        except CheckpointError:
            tokenizer_file = None
        ids = {}
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, Path(tok_dir) / "tokenizer.json")
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                          "model_max_length": cfg.model.max_position_embeddings}
            eod = _eod_token(cfg, tokenizer_file)
            if eod is not None:
                tok_config["eos_token"] = eod[1]
                # GPT-2's convention: without a separate beginning-of-sequence token, bos = eos.
                ids = {"eos_token_id": eod[0], "bos_token_id": eod[2] if eod[2] is not None else eod[0]}
            (Path(tok_dir) / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        model.hf_source = {"path": None, "config": ids}  # token ids for the exported config
        written = to_hf(model, out, tokenizer_dir=tok_dir if tokenizer_file else None, write=True)
    return Path(written)


def _eod_token(cfg: Config, tokenizer_file: str) -> tuple[int, str, int | None] | None:
    """(id, text, beginning-of-sequence id or None) of the data's end-of-document token, from its manifest."""
    for prefix in cfg.data.prefixes:
        info = read_manifest(prefix) or {}
        eod_id = info.get("eod_token_id")
        if eod_id is not None:
            token = Tokenizer.from_file(tokenizer_file).id_to_token(int(eod_id))
            return (int(eod_id), token, info.get("bos_token_id")) if token is not None else None
    return None
