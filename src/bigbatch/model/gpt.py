"""A GPT decoder. It knows nothing of DDP, autocast or accumulation: input ids in, logits out.

Pre-LayerNorm blocks, causal attention, GELU MLP, learned positions, tied input and output
embeddings, GPT-2 initialisation (residual projections scaled by 1/sqrt(2 * n_layer)).

Attention runs through one of two kernels with the same mathematics (`ATTENTION_KERNELS`):
`sdpa`, `scaled_dot_product_attention`, which picks the flash kernel where the device has one and
never stores the T x T probabilities; and `explicit`, softmax(q k^T / sqrt(d)) v as three plain
ops. On a CPU in bf16 the explicit form's batched matmuls reach the matmul units where SDPA's
CPU flash kernel's blocked loop does not, at the price of T x T probabilities per head kept for
backward (measured: BENCHMARKS.md, "Numbers that were in docstrings"). `resolve_attention` picks
it on CPU only.

With `position_ids` (packed rows whose documents restart at position 0; `data.document_mask`)
each token attends only to earlier tokens of its own document, and its learned position is its
position inside the document, so every document's logits are those it has run alone
(document_attention.py: a boolean mask for either kernel, flex_attention on CUDA). Without them
the model is exactly the plain causal GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.model.document_attention import DocumentMask, flex_available


@dataclass(frozen=True)
class GPTShape:
    """The numbers that fix the model's parameter shapes (saved beside its weights)."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0


ATTENTION_KERNELS = ("sdpa", "explicit")


def resolve_attention(name: str, device_type: str, dtype: str = "bf16") -> str:
    """`auto` -> the faster kernel for the device and precision: explicit on CPU under bf16/fp16
    autocast, SDPA otherwise (flash on GPU). Measured here on the default model's whole step:
    explicit 1.07x SDPA in bf16, but SDPA 1.07x explicit in fp32, where SDPA's CPU kernel
    runs its fp32 matmuls as fast as the explicit ones and saves the T x T round trips."""
    if name == "auto":
        return "explicit" if device_type == "cpu" and dtype in ("bf16", "fp16") else "sdpa"
    return name


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, for (B, heads, T, head_dim) inputs.

    The softmax runs in the inputs' dtype (bf16 under autocast): its probabilities would be
    rounded to bf16 for the matmul with v anyway, and one bf16 copy is what backward keeps."""
    time = q.size(-2)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    # An additive -inf above the diagonal: unlike masked_fill, an add keeps nothing for backward.
    future = torch.full((time, time), float("-inf"), dtype=scores.dtype, device=q.device).triu_(1)
    probs = (scores + future).softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape, kernel: str = "sdpa") -> None:
        super().__init__()
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
        self.kernel = kernel
        self.n_head = shape.n_head
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)
        self.dropout = shape.dropout

    def forward(self, x: torch.Tensor, documents: DocumentMask | None = None) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if documents is not None:
            y = documents.attend(q, k, v, self.kernel == "explicit", dropout_p)
        elif self.kernel == "explicit":
            y = explicit_causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: GPTShape, attention: str = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape, attention)
        self.ln_2 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, documents: DocumentMask | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), documents))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, shape: GPTShape, attention: str = "sdpa") -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.seq_len, shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape, attention) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix for input and output
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.shape.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def uses_flex(self, device: torch.device) -> bool:
        """flex_attention for document masking: on CUDA with the SDPA kernel, where it is
        installed and no attention dropout is asked (flex has none)."""
        return (device.type == "cuda" and self.blocks[0].attn.kernel == "sdpa"
                and not (self.training and self.shape.dropout > 0) and flex_available())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits; or, with `return_hidden`, the final normed hidden states (B, T, d_model), so
        a chunked loss can apply `lm_head` a slice at a time (through DDP's forward).
        `position_ids` (B, T), restarting at 0 at each document: attention within documents."""
        _, time = input_ids.shape
        documents = None
        if position_ids is None:
            positions = torch.arange(time, device=input_ids.device)
        else:
            positions = position_ids
            documents = DocumentMask.build(position_ids, self.uses_flex(input_ids.device))
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x, documents)
        hidden = self.ln_f(x)
        return hidden if return_hidden else self.lm_head(hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.shape.seq_len:]
            logits = self(context)[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids
