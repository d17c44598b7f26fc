"""Chunked cross-entropy: the loss and its gradient over slices of the tokens, so the full
`tokens x vocab` logits (and their fp32 log-softmax and its gradient) never exist at once.

The model returns its final hidden states once; for each slice of `chunk_tokens` tokens the
logits -> loss computation runs under non-reentrant activation checkpointing, which keeps only
the slice's inputs and recomputes its logits in backward, one slice at a time. The sum of the
slices' summed losses is the unchunked summed loss, so gradients are the same up to rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigbatch.engine.step import LossSumFn, lm_loss_sum, token_loss_sum
from bigbatch.model.artifacts import unwrap


def _slice_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                    ) -> torch.Tensor:
    return token_loss_sum(head(hidden), targets)


def chunked_lm_loss_sum(model: nn.Module, batch, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy, as `lm_loss_sum`, `chunk_tokens` tokens at a time."""
    # Through the (possibly DDP-wrapped) model's forward, so its gradient hooks see the call.
    hidden = model(**batch.model_inputs(), return_hidden=True).flatten(0, 1)
    targets = batch.targets.flatten()
    head = unwrap(model).lm_head
    total = None
    for start in range(0, hidden.size(0), chunk_tokens):
        end = start + chunk_tokens
        part = checkpoint(_slice_loss_sum, head, hidden[start:end], targets[start:end],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def describe_loss(loss_kernel: str, loss_chunk_tokens: int) -> str:
    if loss_kernel == "fused":
        from bigbatch.engine.fused_loss import DEFAULT_FUSED_CHUNK

        return (f"fused lm_head + cross-entropy (compiled), chunks of "
                f"{loss_chunk_tokens or DEFAULT_FUSED_CHUNK} tokens")
    if loss_chunk_tokens:
        return f"cross-entropy over checkpointed slices of {loss_chunk_tokens} tokens"
    return "cross-entropy over the whole logits"


def make_loss_sum_fn(loss_chunk_tokens: int, loss_kernel: str = "standard") -> LossSumFn:
    """The built-in GPT's summed loss: the fused kernel (fused_loss.py; chunks of
    `loss_chunk_tokens`, or its default), else `lm_loss_sum` when chunking is off (0), else
    the checkpointed chunks below. `loss_kernel` is resolved already (no "auto")."""
    if loss_kernel == "fused":
        from bigbatch.engine.fused_loss import FusedLinearCrossEntropy

        return FusedLinearCrossEntropy(loss_chunk_tokens)
    if loss_chunk_tokens <= 0:
        return lm_loss_sum

    def loss_sum(model: nn.Module, batch) -> torch.Tensor:
        return chunked_lm_loss_sum(model, batch, loss_chunk_tokens)

    return loss_sum
