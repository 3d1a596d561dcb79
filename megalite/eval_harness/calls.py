"""The model computations behind the harness's requests, in the same order on every rank.

Under N processes rank 0 drives the harness; the other ranks take part in each of rank 0's model calls (the call
and its token ids are broadcast first), so every collective inside the model runs in the same order on every
rank, whatever the harness does between calls. With one process there is nothing to broadcast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError
from megalite.model.sampling import generate_ids


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
