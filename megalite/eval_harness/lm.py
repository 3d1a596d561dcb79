"""The harness's `LM` interface over a megalite model in memory (`HarnessLMBase`), on one process or every rank.

`loglikelihood` (through the harness's `TemplateLM`: the same context/continuation tokenisation as its Hugging Face
backend, contexts truncated from the left to the model's context length, requests sorted and batched by the
harness's own `Collator`), `loglikelihood_rolling` (the harness's rolling windows) and `generate_until` (megalite's
KV-cache sampler, greedy or sampled per the task, stopping at the task's stop sequences and at the
end-of-document token). The model computations run through `ModelCalls` (megalite.eval_harness.calls), so ranks
> 0 follow rank 0's calls. `live_model_class()` is the class a training run uses for `train.eval_tasks`;
megalite.eval_harness.checkpoints adds loading a checkpoint (`MegaliteLM`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from megalite.config import count_parameters
from megalite.errors import ConfigError, DataError
from megalite.eval_harness.calls import ModelCalls

INSTALL_HINT = "install megalite's `eval` extra: pip install 'megalite[eval]' (the lm-eval package)"
# Generation options of the harness's tasks that megalite's sampler implements.
GENERATION_OPTIONS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def require_lm_eval() -> Any:
    """The lm_eval package, or a ConfigError that says which extra provides it."""
    try:
        import lm_eval  # heavy optional dependency (the `eval` extra): imported only when the harness is used
    except ImportError as e:
        raise ConfigError(f"the lm-evaluation-harness is not available ({e}); {INSTALL_HINT}") from None
    return lm_eval


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
    # do_sample without a temperature: the usual 1.0; a temperature of 0 is greedy (as the harness's vLLM backend
    # reads it; its HF backend refuses it), never silently 1.0
    temperature = float(options["temperature"]) if options.get("temperature") is not None else 1.0
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
