"""The fused loss kernel: the lm_head matmul and the cross-entropy, chunk by chunk, with the
gradients computed in forward, so neither the `tokens x vocab` logits nor their fp32
log-softmax, its gradient or the one-hot scatter ever exist whole.

Why: at a 50K vocabulary the standard loss is mostly memory traffic. In bf16 it upcasts the
logits to fp32 (tokens x 50K x 4 bytes: 800 MB per 4,096-token micro-batch), writes the fp32
log-softmax, zero-fills and scatters its gradient, and casts it back: a large share of the step
(BENCHMARKS.md, bench_levers). Per chunk of `chunk_tokens` tokens this kernel computes the logits in the compute dtype,
then one function turns them into the chunk's summed loss and its gradient
softmax - one-hot (in the compute dtype, unscaled); `torch.compile` fuses that function into
two passes over the chunk (the row's log-sum-exp, then the gradient), where eager PyTorch needs
about eight. The grads of the hidden states and of the weight are then two matmuls; backward
only scales them by the incoming scalar (the loss is a sum, divided by the step's token count).

Measured by benchmarks/bench_levers.py (BENCHMARKS.md): it pays at a large vocabulary and is
neutral at a small one, where the loss is a small part of the step; so `model.loss_kernel =
"auto"` uses it from FUSED_MIN_VOCAB up.
Gradients equal the standard loss's (tests/unit/engine/test_fused_loss.py, float64).

Where `torch.compile` is unavailable or fails (no C++ compiler, an unsupported device), the
same function runs eagerly, with one warning: slower, same numbers.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from bigbatch.batch import IGNORE_INDEX
from bigbatch.model.artifacts import unwrap

FUSED_MIN_VOCAB = 32768       # auto: fused from here up (neutral at 8K, ~2x the loss at 50K)
DEFAULT_FUSED_CHUNK = 1024    # tokens per chunk: 1024 x 50K bf16 logits = 100 MB


def loss_and_grad(logits: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk's logits, and its gradient softmax - one-hot (zero on
    ignored targets) in the logits' dtype. Arithmetic in at least fp32."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(wide, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    target_logit = wide.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    probs = torch.exp(wide - lse[:, None])
    one_hot = torch.arange(wide.size(1), device=wide.device)[None, :] == safe[:, None]
    grad = torch.where(valid[:, None], probs - one_hot.to(probs.dtype), 0.0)
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, kernel: FusedLinearCrossEntropy, dtype):
        h_all, w = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty_like(h_all)
        # A frozen lm_head (LoRA) needs no weight gradient: a third of each chunk's matmuls
        # and a vocab x d_model fp32 buffer saved.
        grad_weight = (torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32),
                            device=hidden.device)
        for start in range(0, h_all.size(0), kernel.chunk_tokens):
            h = h_all[start:start + kernel.chunk_tokens]
            loss, grad = kernel.loss_and_grad(h @ w.T, targets[start:start + kernel.chunk_tokens])
            total += loss
            torch.mm(grad, w, out=grad_hidden[start:start + kernel.chunk_tokens])
            if grad_weight is not None:  # fp32 accumulation across chunks (the master's dtype)
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return ((grad_hidden * grad_total.to(grad_hidden.dtype)).to(ctx.hidden_dtype),
                None if grad_weight is None else grad_weight * grad_total.to(grad_weight.dtype),
                None, None, None)


class FusedLinearCrossEntropy:
    """The fused loss for the built-in GPT: a `LossSumFn` (model, micro-batch) -> summed loss.

    One object per run: it holds the compiled chunk function (compiled on first use; the
    inductor cache on disk makes a later process's compile cheap) and the compile time.
    """

    def __init__(self, chunk_tokens: int = DEFAULT_FUSED_CHUNK, compile: bool = True) -> None:
        self.chunk_tokens = chunk_tokens or DEFAULT_FUSED_CHUNK
        self._compiled = torch.compile(loss_and_grad) if compile else None
        self.compile_seconds: float | None = None

    def loss_and_grad(self, logits: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compiled is None:
            return loss_and_grad(logits, targets)
        first = self.compile_seconds is None
        began = time.perf_counter()
        try:
            result = self._compiled(logits, targets)
        except torch.OutOfMemoryError:
            raise  # the micro-batch does not fit: eager would hide it, or fail the same way later
        except Exception as err:  # no compiler, unsupported device: same numbers, eagerly
            print(f"warning: torch.compile of the fused loss failed ({type(err).__name__}); "
                  "running it eagerly", file=sys.stderr)
            self._compiled = None
            return loss_and_grad(logits, targets)
        if first:
            self.compile_seconds = time.perf_counter() - began
        return result

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        # Through the (possibly DDP-wrapped) model's forward, so its gradient hooks see the call.
        hidden = model(**batch.model_inputs(), return_hidden=True).flatten(0, 1)
        weight = unwrap(model).lm_head.weight
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else weight.dtype)
        with torch.autocast(device_type, enabled=False):
            if not torch.is_grad_enabled():  # evaluation: the loss only
                return self._loss_only(hidden.to(dtype), weight.to(dtype),
                                       batch.targets.flatten())
            return _LinearCrossEntropySum.apply(hidden, weight, batch.targets.flatten(), self,
                                                dtype)

    def _loss_only(self, hidden, weight, targets) -> torch.Tensor:
        total = None
        for start in range(0, hidden.size(0), self.chunk_tokens):
            logits = hidden[start:start + self.chunk_tokens] @ weight.T
            loss, _ = self.loss_and_grad(logits, targets[start:start + self.chunk_tokens])
            total = loss if total is None else total + loss
        return total


def resolve_loss_kernel(name: str, vocab_size: int, strategy: str, world_size: int,
                        device_type: str = "cpu") -> str:
    """`model.loss_kernel` for this run: "fused" or "standard" ("auto" decides by vocabulary and
    device).

    "auto" fuses on a CPU only: on an H200 the fused kernel's 1,024-token chunks made the 50K-
    vocabulary step 0.78x the plain loop's (bench_gpu, 2026-12-04), where the whole logits are a
    few hundred MB of a 141 GB card; a GPU run short of memory names "fused" (or the planner's
    loss_chunk_tokens). FSDP keeps the lm_head weight sharded outside the model's forward, where
    this kernel reads it whole, so FSDP runs use the standard loss."""
    sharded = strategy == "fsdp" and world_size > 1
    if name == "auto":
        fuse = vocab_size >= FUSED_MIN_VOCAB and not sharded and device_type == "cpu"
        return "fused" if fuse else "standard"
    if name == "fused" and sharded:
        from bigbatch.errors import UsageError

        raise UsageError("model.loss_kernel = 'fused' does not work with parallel.strategy = "
                         "'fsdp' (the lm_head weight is sharded outside the forward): use "
                         "'standard' or 'auto', or parallel.strategy = 'ddp'")
    return name
