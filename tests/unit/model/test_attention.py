"""The two attention kernels compute the same function: logits and gradients of the whole GPT with
the explicit softmax(q k^T) v kernel equal those with `scaled_dot_product_attention`."""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.engine.step import lm_loss_sum
from bigbatch.model.gpt import GPT, GPTShape, resolve_attention

SHAPE = GPTShape(vocab_size=64, seq_len=24, n_layer=2, n_head=4, d_model=32)


def Batch(ids: torch.Tensor) -> MicroBatch:  # noqa: N802 - reads as the batch it makes
    return MicroBatch(ids[:, :-1], ids[:, 1:])


def loss_and_grads(attention: str, dtype: torch.dtype, batch: MicroBatch, autocast: bool = False):
    torch.manual_seed(0)
    model = GPT(SHAPE, attention=attention).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = lm_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def batch() -> MicroBatch:
    return Batch(torch.randint(0, SHAPE.vocab_size, (3, SHAPE.seq_len + 1),
                               generator=torch.Generator().manual_seed(1)))


def test_explicit_kernel_equals_sdpa_in_float64(batch):
    loss_sdpa, grads_sdpa = loss_and_grads("sdpa", torch.float64, batch)
    loss_explicit, grads_explicit = loss_and_grads("explicit", torch.float64, batch)
    assert torch.allclose(loss_explicit, loss_sdpa, rtol=1e-12, atol=0)
    for name, grad in grads_sdpa.items():
        error = (grads_explicit[name] - grad).norm() / grad.norm()
        assert error < 1e-10, (name, float(error))


def test_explicit_kernel_is_causal(batch):
    """Changing a later token changes no earlier logit."""
    torch.manual_seed(0)
    model = GPT(SHAPE, attention="explicit").double()
    changed = batch.inputs.clone()
    changed[:, 10] = (changed[:, 10] + 1) % SHAPE.vocab_size
    before, after = model(batch.inputs), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.equal(before[:, 10:], after[:, 10:])


def test_explicit_kernel_matches_sdpa_under_bf16_autocast(batch):
    """Same function at bf16 precision: the losses agree to bf16 rounding."""
    loss_sdpa, _ = loss_and_grads("sdpa", torch.float32, batch, autocast=True)
    loss_explicit, _ = loss_and_grads("explicit", torch.float32, batch, autocast=True)
    assert torch.allclose(loss_explicit, loss_sdpa, rtol=1e-2)


def test_auto_picks_explicit_on_cpu_only():
    assert resolve_attention("auto", "cpu") == "explicit"
    assert resolve_attention("auto", "cpu", "fp16") == "explicit"
    assert resolve_attention("auto", "cpu", "fp32") == "sdpa"  # SDPA is faster in fp32 here
    assert resolve_attention("auto", "cuda") == "sdpa"
    assert resolve_attention("sdpa", "cpu") == "sdpa"
