"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full logits.

With `z_loss` > 0 each token's loss also has z * lse^2 (lse = log of the softmax's normaliser), PaLM's
auxiliary term that keeps the logits from drifting upward; its gradient is 2 z lse * softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.mappings import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Group, z_loss: float) -> torch.Tensor:
        # logits: (..., V/tp) this rank's vocabulary slice; target: (...) global ids
        n = group_size(group)
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if n > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # new tensor: the caller's logits stay untouched

        local = shifted.shape[-1]
        start = group_rank(group) * local
        outside = (target < start) | (target >= start + local)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if n > 1:
            # One all-reduce for both sums.
            both = torch.stack([predicted, sum_exp])
            dist.all_reduce(both, group=group)
            predicted, sum_exp = both[0], both[1]
        loss = sum_exp.log() - predicted
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        if z_loss > 0:
            lse = sum_exp.log() + logits_max
            loss = loss + z_loss * lse.square()
            # d(z lse^2)/d logit = 2 z lse softmax: folded into the softmax the backward scales.
            softmax.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax.clone()
        # d loss / d logit = softmax - onehot(target); the onehot lives on the rank owning the target.
        hit = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group = None, z_loss: float = 0.0
) -> torch.Tensor:
    """Per-token fp32 loss, equal to F.cross_entropy(gathered logits, target, reduction='none')
    (+ z_loss * logsumexp(gathered logits)^2)."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, float(z_loss))
