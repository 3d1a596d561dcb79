"""Evaluation during a training run: the validation loss (`Evaluator`) and the lm-evaluation-harness tasks of
`train.eval_tasks` on the live model (`TaskEvaluator`). The trainer asks `Evaluator.due(step)` each step and runs
both when it says so."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from megalite.checkpoint.consolidate import run_tokenizer
from megalite.config import Config
from megalite.data import BatchStream, ResumableSampler
from megalite.errors import ConfigError, MegaliteError
from megalite.eval_harness import (
    find_tasks,
    live_model_class,
    load_tasks,
    main_metrics,
    preserved_rng,
    require_lm_eval,
    run_tasks,
)


class Evaluator:
    """Validation loss and perplexity every `train.eval_interval` steps and at the end (same on every rank)."""

    def __init__(self, cfg: Config, strategy: Any, valid_set: Any, dp_rank: int, dp_size: int,
                 device: torch.device) -> None:
        self.cfg, self.strategy, self.valid_set = cfg, strategy, valid_set
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_interval
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    @torch.no_grad()
    def run(self, engine: Any) -> dict | None:
        """Mean loss over train.eval_steps micro-batches from the start of the validation split."""
        if self.valid_set is None:
            return None
        sampler = ResumableSampler(len(self.valid_set), self.dp_rank, self.dp_size, self.cfg.micro_batch_size,
                                   self.cfg.train.seed, shuffle=False)
        stream = BatchStream(self.valid_set, sampler, self.device)
        engine.eval()
        total = self.strategy.eval_total(engine, stream, self.cfg.train.eval_steps)
        engine.train()
        mean = torch.tensor([total / self.cfg.train.eval_steps], dtype=torch.float64)
        dist.all_reduce(mean, group=self.strategy.grid.get_data_parallel_group())
        loss = mean.item() / self.dp_size
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class TaskEvaluator:
    """`train.eval_tasks`: lm-evaluation-harness tasks on the live model, at each evaluation (megalite.eval_harness).

    The tasks are resolved and their data loaded at start, so an unknown task or missing data fails before step 1.
    Every rank takes part in a run (rank 0 drives the harness, the others serve its model calls); the model's
    train/eval mode and Python's, numpy's and torch's random states are left as they were (the harness seeds them).
    """

    def __init__(self, cfg: Config, is_main: bool) -> None:
        require_lm_eval()
        self.settings = cfg.train.eval_tasks
        self.seed = cfg.train.seed
        self.tokenizer, self.eod, self.bos = run_tokenizer(cfg)
        if self.eod is None:
            raise ConfigError("train.eval_tasks: the data's tokenizer has no end-of-document token, which the harness "
                              "needs as the end of text")
        self.manager, self.names = None, []
        if is_main:
            self.manager, self.names = find_tasks(self.settings.tasks, self.settings.include_path,
                                                  where="train.eval_tasks.tasks")
            load_tasks(self.manager, self.names)  # data problems now, not at the first evaluation

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """{"task/metric": score} of each task's main metric on rank 0, {} on the other ranks."""
        was_training = model.training
        model.eval()
        lm = live_model_class().for_model(model, self.tokenizer, self.eod, self.bos,
                                          batch_size=self.settings.batch_size, seed=self.seed)
        try:
            with preserved_rng():
                if not lm.calls.is_driver:
                    if not lm.calls.serve():
                        raise MegaliteError("train.eval_tasks failed on rank 0 (its error is reported there)")
                    return {}
                ok = False
                try:
                    results = run_tasks(lm, self.manager, self.names, num_fewshot=self.settings.num_fewshot,
                                        limit=self.settings.limit, bootstrap_iters=0)
                    ok = True
                finally:
                    lm.calls.close(ok)
                return main_metrics(results, self.names)
        finally:
            model.train(was_training)

