"""Checkpointed blocks give the plain blocks' loss and gradients, and keep fewer activations."""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.engine.step import lm_loss_sum
from bigbatch.model.checkpointing import apply_activation_checkpointing, blocks_to_checkpoint
from bigbatch.model.gpt import GPT, GPTShape

SHAPE = GPTShape(vocab_size=128, seq_len=16, n_layer=4, n_head=2, d_model=16)


def _run(mode: str, every: int = 1):
    torch.manual_seed(0)
    model = GPT(SHAPE).double()
    count = apply_activation_checkpointing(model, mode, every)
    batch = MicroBatch(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        loss = lm_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return count, loss.detach(), grads, sum(saved), model


@pytest.mark.parametrize("mode, every, expected", [("all", 1, 4), ("every_n", 2, 2),
                                                   ("every_n", 3, 2)])
def test_checkpointed_gradients_equal_plain(mode, every, expected):
    _, loss, grads, saved, plain_model = _run("none")
    count, ckpt_loss, ckpt_grads, ckpt_saved, model = _run(mode, every)
    assert count == expected
    assert torch.equal(ckpt_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-12, atol=0)
    assert ckpt_saved < saved  # the blocks' insides are recomputed, not kept
    assert model.state_dict().keys() == plain_model.state_dict().keys()


def test_block_selection():
    assert blocks_to_checkpoint(5, "none", 1) == []
    assert blocks_to_checkpoint(5, "auto", 1) == []  # unresolved auto: nothing
    assert blocks_to_checkpoint(5, "all", 1) == [0, 1, 2, 3, 4]
    assert blocks_to_checkpoint(5, "every_n", 2) == [0, 2, 4]
