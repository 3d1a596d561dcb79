"""Shared pieces of the engine tests: a tiny token dataset and a tiny run config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_token_dataset(prefix: str, vocab_size: int = 97, num_docs: int = 60, seed: int = 0) -> str:
    """Random documents with an end-of-document token (id 0), with the manifest the loader reads."""
    from megalite.data import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(5, 40))
        # A learnable pattern (each token predicts the next) so losses fall and steps differ.
        start = int(rng.integers(1, vocab_size))
        doc = (start + np.arange(n) * int(rng.integers(1, 4))) % (vocab_size - 1) + 1
        writer.add_document(np.append(doc, 0).astype(np.uint16))
    writer.finalize()
    Path(f"{prefix}.json").write_text(json.dumps({"eod_token_id": 0, "bos_token_id": None, "vocab_size": vocab_size,
                                                  "num_documents": num_docs}))
    return prefix


def tiny_config(prefix: str, output_dir: str, **sections) -> dict:
    """A raw run config of a 2-layer model over `prefix`; `sections` update each section."""
    raw = {
        "model": {"vocab_size": 97, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 32,
                  "make_vocab_size_divisible_by": 4},
        "parallel": {"tensor": 1, "pipeline": 1},
        "data": {"prefixes": [prefix], "split": "90,10,0", "seq_length": 16, "cache_dir": str(Path(output_dir) / "cache")},
        "train": {"steps": 10, "seed": 7, "output_dir": output_dir, "log_interval": 1, "eval_interval": 0,
                  "eval_steps": 2, "kernels": "torch", "logging": {"progress_bar": False, "plot": False},
                  "collective_timeout_s": 60},
        "deepspeed": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8,
                                                                "weight_decay": 0.1}},
                      "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 3, "cos_min_ratio": 0.1}},
                      "gradient_clipping": 0.5, "zero_optimization": {"stage": 0}},
    }
    for section, values in sections.items():
        if isinstance(raw.get(section), dict) and isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(raw[section].get(k), dict):
                    raw[section][k].update(v)
                else:
                    raw[section][k] = v
        else:
            raw[section] = values
    return raw


def init_from_report(raw: dict, source_state: dict) -> dict:
    """Build a Run from `raw` (with train.init_from): whether its gathered weights have the source's names, their
    largest difference from `source_state`, and the error when model.hidden_size no longer matches the source."""
    from megalite import config as C
    from megalite.engine.trainer import Trainer
    from megalite.model import full_state_dict, tensor_parallel_group

    run = Trainer(C.from_dict(raw))
    ours = full_state_dict(run.engine.module, tensor_parallel_group(run.grid))
    report = {"keys_equal": set(ours) == set(source_state),
              "max_diff": max((ours[k].float() - source_state[k].float()).abs().max().item() for k in source_state)}
    del run
    changed = {**raw, "model": {**raw["model"], "hidden_size": 64}}
    try:
        Trainer(C.from_dict(changed))
        report["mismatch"] = "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        report["mismatch"] = str(e)
    return report


def reference_optimizer(model, cfg, **scheduler_args):  # noqa: ANN001, ANN201 - torch types imported lazily
    """The plain PyTorch loop's AdamW and learning-rate schedule for `cfg`, built independently of megalite's build
    code: weight decay on the matrices but the embeddings, DeepSpeed's own class for the configured schedule
    (`scheduler_args` added to its parameters). Returns (optimizer, scheduler)."""
    import torch
    from deepspeed.runtime import lr_schedules

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    opt_params = cfg.deepspeed["optimizer"]["params"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt_params["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opt_params["lr"], betas=tuple(opt_params["betas"]), eps=opt_params["eps"])
    spec = cfg.deepspeed["scheduler"]
    return opt, getattr(lr_schedules, spec["type"])(opt, **scheduler_args, **spec["params"])
