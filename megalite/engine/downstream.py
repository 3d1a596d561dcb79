"""EleutherAI's lm-evaluation-harness on a megalite model in memory: the harness's `LM` interface, task lookup and
loading, on one process or on every rank of a run (megalite.eval_harness builds on it for checkpoints and the
harness's command line; the training loop runs it for `train.eval_tasks`).

`HarnessLMBase` implements the harness's `LM` interface over megalite's own model and the run's tokenizer:
`loglikelihood` (through the harness's `TemplateLM`: the same context/continuation tokenisation as its
Hugging Face backend, contexts truncated from the left to the model's context length, requests sorted and
batched by the harness's own `Collator`), `loglikelihood_rolling` (the harness's rolling windows) and
`generate_until` (megalite's KV-cache sampler, greedy or sampled per the task, stopping at the task's stop
sequences and at the end-of-document token).

Under N processes rank 0 drives the harness; the other ranks take part in each of rank 0's model calls
(`ModelCalls`: the call and its token ids are broadcast first), so every collective inside the model runs in
the same order on every rank, whatever the harness does between calls.

lm_eval is imported inside functions only: it is a heavy optional dependency (the `eval` extra), and
`import megalite` / `megalite --help` / a training run without `train.eval_tasks` must work without it.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalite.config import count_parameters
from megalite.errors import ConfigError, DataError, MegaliteError
from megalite.model.sampling import generate_ids

INSTALL_HINT = "install megalite's `eval` extra: pip install 'megalite[eval]' (the lm-eval package)"
DATA_HINT = (
    "Without network the harness reads each task's dataset from the local Hugging Face datasets cache "
    "(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets): run the task once where the network is "
    "reachable (HF_DATASETS_OFFLINE unset) and copy that cache here, or write a task YAML whose dataset_path "
    "is `json` with dataset_kwargs.data_files naming local files, in a folder given with --include-path"
)
# Generation options of the harness's tasks that megalite's sampler implements.
GENERATION_OPTIONS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def require_lm_eval() -> Any:
    """The lm_eval package, or a ConfigError that says which extra provides it."""
    try:
        import lm_eval  # heavy optional dependency (the `eval` extra): imported only when the harness is used
    except ImportError as e:
        raise ConfigError(f"the lm-evaluation-harness is not available ({e}); {INSTALL_HINT}") from None
    return lm_eval


# ----------------------------------------------------------------------------- model calls in lockstep


class ModelCalls:
    """The model computations behind the harness's requests, run in the same order on every rank.

    Rank 0 (the driver) broadcasts each call with its token ids before running it; the other ranks run
    `serve()`, which executes the calls it receives until rank 0 sends "stop". With one process there is
    nothing to broadcast.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eod_token_id: int | None) -> None:
        self.model, self.tokenizer, self.eod_token_id = model, tokenizer, eod_token_id
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.closed = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # The two calls the harness's requests need.
    def log_probs(self, rows: list[list[int]], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """fp32 log-softmax over the vocabulary at positions [start, end) of each row (rows right-padded)."""
        return self._call("log_probs", rows, spans)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, until: list[str]) -> list[list[int]]:
        """New tokens for equal-length prompts, up to the end-of-document token or a stop sequence (both kept)."""
        return self._call("generate", prompts, max_new_tokens, temperature, top_k, top_p, seed, until)

    def _call(self, op: str, *args: Any) -> Any:
        if self.closed:
            raise MegaliteError("the megalite harness model was closed; create a new one")
        if self.world > 1:
            dist.broadcast_object_list([(op, args)], src=0)
        return self._run(op, args)

    def serve(self) -> bool:
        """Ranks > 0: run rank 0's calls until it stops; returns whether rank 0 finished without an error."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            op, args = box[0]
            if op == "stop":
                self.closed = True
                return bool(args[0])
            self._run(op, args)

    def close(self, ok: bool = True) -> None:
        """Rank 0: release the other ranks from `serve()` (once)."""
        if self.closed or not self.is_driver:
            return
        self.closed = True
        if self.world > 1:
            dist.broadcast_object_list([("stop", (ok,))], src=0)

    @torch.no_grad()
    def _run(self, op: str, args: tuple) -> Any:
        if op == "log_probs":
            rows, spans = args
            ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=self.device)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            # Right padding never reaches the real positions of a causal model; padded vocabulary rows are cut.
            logits = self.model(ids, gather_logits=True)[..., : self.vocab_size]
            if not self.is_driver:
                return None
            return [torch.log_softmax(logits[i, a:b].float(), dim=-1).cpu() for i, (a, b) in enumerate(spans)]
        if op == "generate":
            prompts, max_new_tokens, temperature, top_k, top_p, seed, until = args
            prompt = torch.tensor(prompts, dtype=torch.long, device=self.device)
            out = generate_ids(self.model, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                               stop=lambda new: all(self._finished(row, until) for row in new.tolist()))
            return [row[prompt.shape[1]:] for row in out.tolist()]
        raise ValueError(f"unknown model call {op!r}")

    def _finished(self, tokens: list[int], until: list[str]) -> bool:
        if self.eod_token_id is not None and self.eod_token_id in tokens:
            return True
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(stop and stop in text for stop in until)


# ----------------------------------------------------------------------------- the harness's LM


class HarnessLMBase:
    """The harness's `LM` methods over a megalite model in memory; `live_model_class()` (and megalite.eval_harness's
    `MegaliteLM`, which also loads checkpoints) combine them with the harness's `TemplateLM`. Build one with
    `for_model`."""

    backend = "causal"

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer: Any, eod_token_id: int | None, bos_token_id: int | None,
                  batch_size: int | str = 8, max_length: int | None = None, seed: int = 1234,
                  step_dir: Path | None = None) -> Any:
        """A harness model over a model already built (a training run's, or `load_for_inference`'s). On ranks > 0
        the caller runs `lm.calls.serve()` while rank 0 drives the harness, then `lm.calls.close()`."""
        self = cls.__new__(cls)
        super(HarnessLMBase, self).__init__()  # the harness's LM state (TemplateLM's __init__)
        self._setup(model, tokenizer, eod_token_id, bos_token_id, batch_size, max_length, seed)
        self.step_dir = step_dir
        return self

    def _setup(self, model: torch.nn.Module, tokenizer: Any, eod_token_id: int | None, bos_token_id: int | None,
               batch_size: int | str, max_length: int | str | None, seed: int | str) -> None:
        if eod_token_id is None:
            raise DataError("the run's tokenizer has no end-of-document token, which the harness needs as the end "
                            "of text (give the data's tokenizer with tokenizer=FILE / --tokenizer)")
        if str(batch_size).startswith("auto"):
            raise ConfigError(f"batch size {batch_size!r}: the megalite model needs a number")
        self.calls = ModelCalls(model, tokenizer, eod_token_id)
        self.tokenizer = tokenizer
        self._eod, self._bos = int(eod_token_id), bos_token_id
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        if self._max_length > model.config.max_position_embeddings:
            raise ConfigError(f"max_length={self._max_length} exceeds the model's max_position_embeddings="
                              f"{model.config.max_position_embeddings}")
        self._seed = int(seed)
        self._generate_calls = 0
        self._prefix_text = tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

    # ------------------------------------------------------------- the harness's properties
    @property
    def eot_token_id(self) -> int:
        return self._eod

    @property
    def prefix_token_id(self) -> int:
        # As the harness's HF backend: the beginning-of-sequence token when the tokenizer has one, else end of text.
        return self._bos if self._bos is not None else self._eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # the harness's HF backend default

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.calls.device

    @property
    def tokenizer_name(self) -> str:
        return "megalite"

    def get_model_info(self) -> dict:
        """Shown in the harness's result `config`."""
        return {"model_num_parameters": count_parameters(self.calls.model.config)["total"],
                "processes": self.calls.world, "checkpoint": str(self.step_dir) if self.step_dir else None}

    # ------------------------------------------------------------- tokenisation
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        # The HF backend's rule: the tokenizer's special tokens are added unless the text already starts with the
        # prefix token.
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self._prefix_text)
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it) per request, computed as
        the harness's HF backend does: requests sorted longest first, contexts sharing all but the last
        continuation token scored once, each row the last max_length tokens of context + continuation[:-1]."""
        from lm_eval.models.utils import Collator
        from tqdm import tqdm

        def longest_first(req: tuple) -> tuple:
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        reorder = Collator(requests, sort_fn=longest_first, group_by="contexts",
                           group_fn=lambda req: req[-2] + req[-1][:-1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="megalite loglikelihood requests", file=sys.stderr)
        for chunk in reorder.get_batched(n=override_bs or self.batch_size):
            rows, spans = [], []
            for _, context, continuation in chunk:
                if not context or not continuation or len(continuation) > self.max_length:
                    raise DataError(f"a request with {len(context)} context and {len(continuation)} continuation "
                                    f"tokens cannot be scored with max_length={self.max_length}")
                row = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(row)
                spans.append((len(row) - len(continuation), len(row)))
            for (request, context, continuation), log_probs in zip(chunk, self.calls.log_probs(rows, spans)):
                log_probs = log_probs.unsqueeze(0)  # (1, continuation, vocab)
                greedy = log_probs.argmax(dim=-1)
                for request_str, cont, logits in reorder.get_cache(req_str=request, cxt_toks=context,
                                                                   cont_toks=continuation, logits=log_probs):
                    cont = torch.tensor(cont, dtype=torch.long).unsqueeze(0)
                    is_greedy = bool((greedy[:, -cont.shape[1]:] == cont).all())
                    answer = (float(torch.gather(logits, 2, cont.unsqueeze(-1)).sum()), is_greedy)
                    results.append(answer)
                    if request_str is not None:  # rolling windows are cached per document, not per window
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    bar.update(1)
        bar.close()
        return reorder.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over the harness's disjoint rolling windows of max_length tokens, the
        first conditioned on the prefix token."""
        from lm_eval import utils

        windows, counts = [], []
        for (text,) in [req.args for req in requests]:
            doc = [(None, *w) for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))]
            windows += doc
            counts.append(len(doc))
        scores = []
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start: start + self.batch_size]
            scores += [ll for ll, _ in self._loglikelihood_tokens(batch, disable_tqdm=True, override_bs=len(batch))]
        totals, start = [], 0
        for req, n in zip(requests, counts):
            totals.append(sum(scores[start: start + n]))
            start += n
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, totals[-1])
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations per the task's generation options (greedy unless do_sample), cut at the first stop
        sequence; the end-of-document token always ends a continuation."""
        from lm_eval.models.utils import (
            Collator,
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )
        from tqdm import tqdm

        reorder = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="megalite generate_until requests", file=sys.stderr)
        for chunk in reorder.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            options = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(options.pop("until", None), eos=eos_text)
            max_gen_toks = options.pop("max_gen_toks")
            temperature, top_k, top_p = _sampling(options)
            max_context = self.max_length - max_gen_toks
            if max_context <= 0:
                raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no room for a context within the model's "
                                  f"max_length={self.max_length}")
            encoded = [self.tok_encode(c, left_truncate_len=max_context) for c in contexts]
            outputs: dict[int, list[int]] = {}
            # One generation per run of equal-length prompts: megalite's KV cache has no padding mask.
            for length in sorted({len(e) for e in encoded}, reverse=True):
                same = [i for i, e in enumerate(encoded) if len(e) == length]
                if length == 0:
                    raise DataError("a generation request has an empty context")
                self._generate_calls += 1
                new = self.calls.generate([encoded[i] for i in same], max_gen_toks, temperature, top_k, top_p,
                                          self._seed + self._generate_calls, until)
                outputs.update(zip(same, new))
            for i, (context, kwargs) in enumerate(chunk):
                tokens = outputs[i]
                if self.eot_token_id in tokens:
                    tokens = tokens[: tokens.index(self.eot_token_id)]
                text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                bar.update(1)
        bar.close()
        return reorder.get_original(results)


def _sampling(options: dict) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) from a task's normalised generation options; temperature 0 is greedy."""
    unknown = sorted(set(options) - GENERATION_OPTIONS)
    if unknown:
        raise ConfigError(f"generation option(s) {unknown} are not supported by the megalite model "
                          f"(supported: {', '.join(sorted(GENERATION_OPTIONS))})")
    if not options.get("do_sample"):
        return 0.0, None, None
    temperature = float(options.get("temperature") or 1.0)  # do_sample without a temperature: the usual 1.0
    top_k = options.get("top_k")
    top_p = options.get("top_p")
    return temperature, int(top_k) if top_k else None, float(top_p) if top_p is not None else None


_LIVE_CLASS: type | None = None


def live_model_class() -> type:
    """`HarnessLMBase` on the harness's `TemplateLM` (imports lm_eval), for a model in memory; not registered under a
    name (megalite.eval_harness registers `MegaliteLM`, which can also load a checkpoint, as "megalite")."""
    global _LIVE_CLASS
    if _LIVE_CLASS is None:
        require_lm_eval()
        from lm_eval.api.model import TemplateLM

        _LIVE_CLASS = type("MegaliteLiveLM", (HarnessLMBase, TemplateLM),
                           {"__module__": __name__, "__doc__": HarnessLMBase.__doc__})
    return _LIVE_CLASS


# ----------------------------------------------------------------------------- tasks


def find_tasks(names: list[str], include_path: str | None = None, where: str = "--tasks") -> tuple[Any, list[str]]:
    """(the harness's TaskManager, the task names `names` resolve to). An unknown name is a ConfigError listing the
    harness's close names. The built-in task index (a few seconds to build) is read only when a name is not
    among the user's own tasks in `include_path`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"{'--include-path' if where == '--tasks' else 'train.eval_tasks.include_path'}: "
                          f"{include_path!r} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(_plain_tasks(manager, manager.match_tasks([n])) for n in names):
        manager = TaskManager(include_path=include_path)  # the user's groups and tags may name built-in tasks
    problems, resolved = [], []
    for name in names:
        matches = manager.match_tasks([name])
        if not matches:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            problems.append(f"{where}: unknown task {name!r}{hint} (`lm-eval ls tasks` lists them all)")
        resolved += [m for m in matches if m not in resolved]
    if problems:
        raise ConfigError(problems)
    return manager, resolved


def _plain_tasks(manager: Any, names: list[str]) -> bool:
    """Whether `names` are all single tasks (no groups or tags) of the manager's index."""
    from lm_eval.tasks._index import Kind

    return bool(names) and all(manager.task_index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names)


def load_tasks(manager: Any, names: list[str]) -> list[Any]:
    """The harness's Task/Group objects with their data, one name at a time, so that a task whose data cannot be
    loaded is named (DataError) instead of failing deep inside `datasets`."""
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except Exception as e:  # noqa: BLE001 - datasets/fsspec/hub errors of every kind: name the task
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"task {name!r}: its data could not be loaded ({type(e).__name__}: {first_line}). "
                            f"{DATA_HINT}") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built += [t for t in loaded["tasks"].values() if t not in built]
    return built


def run_tasks(lm: Any, manager: Any, names: list[str], num_fewshot: int | None = None,
              limit: int | float | None = None, log_samples: bool = False, **harness_options: Any) -> dict:
    """The harness's evaluation of `names` on `lm` (rank 0), with its usual seeds; its result dict."""
    from lm_eval import simple_evaluate

    tasks = load_tasks(manager, names)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               log_samples=log_samples, batch_size=lm.batch_size, **harness_options)


def main_metrics(results: dict, names: list[str]) -> dict[str, float]:
    """Each task's main metric (the first the task reports), as {"task/metric": value}."""
    scores = {}
    for name in names:
        for key, value in results.get("results", {}).get(name, {}).items():
            # Metric entries are "metric,filter"; the others (alias, sample_len, ...) describe the task.
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            label = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            scores[f"{name}/{label}"] = float(value)
            break
    return scores


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """The harness seeds Python, numpy and torch; a training run's own random streams must not notice."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])
