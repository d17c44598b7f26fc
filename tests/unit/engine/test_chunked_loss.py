"""Chunked cross-entropy equals the whole-logits loss: same value, same gradients (float64)."""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import IGNORE_INDEX, MicroBatch
from bigbatch.engine.chunked_loss import make_loss_sum_fn
from bigbatch.engine.step import lm_loss_sum
from bigbatch.model.gpt import GPT, GPTShape

SHAPE = GPTShape(vocab_size=300, seq_len=24, n_layer=2, n_head=2, d_model=16)


def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(SHAPE).double()
    inputs = torch.randint(0, SHAPE.vocab_size, (3, SHAPE.seq_len))
    targets = torch.randint(0, SHAPE.vocab_size, (3, SHAPE.seq_len))
    targets[1, 5:9] = IGNORE_INDEX  # masked targets must be skipped in every slice
    return model, MicroBatch(inputs, targets)


def _grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 24, 50, 1000])
def test_chunked_gradients_equal_unchunked_in_float64(chunk_tokens):
    """Max relative error <= 1e-6 for every parameter (chunks that do and do not divide 72)."""
    model, batch = _model_and_batch()
    loss, grads = _grads(model, batch, lm_loss_sum)
    chunked_loss, chunked = _grads(model, batch, make_loss_sum_fn(chunk_tokens))
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for name, grad in grads.items():
        error = (chunked[name] - grad).abs().max() / grad.abs().max().clamp(min=1e-30)
        assert error <= 1e-6, f"{name}: relative error {error:.2e}"


def test_zero_means_the_plain_loss():
    assert make_loss_sum_fn(0) is lm_loss_sum


def test_forward_is_unchanged_by_return_hidden():
    """forward() stays bitwise the same; the hidden states give the same logits through lm_head."""
    model, batch = _model_and_batch()
    logits = model(batch.inputs)
    hidden = model(batch.inputs, return_hidden=True)
    assert hidden.shape == (3, SHAPE.seq_len, SHAPE.d_model)
    assert torch.equal(model.lm_head(hidden), logits)
