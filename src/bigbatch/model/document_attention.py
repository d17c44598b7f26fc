"""Attention within documents for packed rows (document masking): query i attends to key j only
where j <= i and both lie in the same document.

Documents are read from `position_ids` (MicroBatch.position_ids): a new document starts wherever
the position is 0. Two forms of the one mask, built once per forward and shared by every block:

- `mask`: a boolean (B, 1, T, T) tensor, True where attention is allowed, for
  `scaled_dot_product_attention` (which takes it with backward on every device) and the explicit
  kernel (as an additive -inf);
- `block_mask`: flex_attention's BlockMask on CUDA, where the compiled flex kernel skips the
  blocks that lie wholly outside every document instead of computing and discarding them. Flex
  has no dropout and (in PyTorch 2.13) no backward on CPU, so everywhere else the boolean mask
  serves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: equal exactly for tokens of one document (a new one at each position 0)."""
    return (position_ids == 0).cumsum(dim=-1)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and within one document."""
    docs = document_ids(position_ids)
    time = docs.size(-1)
    causal = torch.ones(time, time, dtype=torch.bool, device=docs.device).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)


def document_mask_mod(docs: torch.Tensor):
    """flex_attention's mask_mod for `docs` (document_ids): the same rule as
    `document_causal_mask`, evaluated per (batch, head, query, key) index."""

    def causal_within_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    return causal_within_document


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class DocumentMask:
    """What every block's attention needs to stay within documents: one of the two forms."""

    mask: torch.Tensor | None = None  # (B, 1, T, T) bool, True = attend
    block_mask: Any = None            # a flex_attention BlockMask
    _additive: dict = field(default_factory=dict)  # the explicit kernel's, by dtype: built once

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as 0 / -inf in `dtype`, for all the blocks of one forward."""
        if dtype not in self._additive:
            blocked = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._additive[dtype] = blocked.masked_fill_(~self.mask, float("-inf"))
        return self._additive[dtype]

    @classmethod
    def build(cls, position_ids: torch.Tensor, use_flex: bool) -> DocumentMask:
        if not use_flex:
            return cls(mask=document_causal_mask(position_ids))
        from torch.nn.attention.flex_attention import create_block_mask

        batch, time = position_ids.shape
        # Rebuilt for every batch (its documents differ); compiled so the mask_mod is evaluated
        # by a kernel, not one Python call per block.
        block_mask = create_block_mask(document_mask_mod(document_ids(position_ids)), batch,
                                       None, time, time, device=position_ids.device,
                                       _compile=position_ids.is_cuda)
        return cls(block_mask=block_mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, explicit: bool,
               dropout_p: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) where allowed) v, for (B, heads, T, head_dim) inputs."""
        if self.block_mask is not None:
            return flex(q, k, v, self.block_mask)
        if explicit:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
            # An additive -inf where not allowed: an add keeps nothing for backward.
            probs = (scores + self.additive(scores.dtype)).softmax(dim=-1)
            if dropout_p > 0:
                probs = F.dropout(probs, dropout_p)
            return torch.matmul(probs, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """flex_attention, compiled on CUDA (its eager form materialises the scores; torch.compile
    caches one kernel per shape, so sequence-length warmup compiles once per length). On CPU
    it runs eagerly, forward only: tests compare it with the boolean mask there."""
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask)
    return compiled_flex()(q, k, v, block_mask=block_mask)


@functools.cache
def compiled_flex() -> Any:
    """torch.compile(flex_attention), made once per process on first use."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
