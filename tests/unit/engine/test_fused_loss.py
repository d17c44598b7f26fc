"""The fused loss kernel (lm_head + cross-entropy chunk by chunk, gradients in forward) equals the
standard loss: same value, same gradients, in float64, eager and compiled; through train_step;
and `auto` picks it only where it pays and where it works."""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import IGNORE_INDEX
from bigbatch.engine.chunked_loss import make_loss_sum_fn
from bigbatch.engine.fused_loss import (
    FUSED_MIN_VOCAB,
    FusedLinearCrossEntropy,
    loss_and_grad,
    resolve_loss_kernel,
)
from bigbatch.engine.precision import Precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.planning.memory import ModelDims, Setup, logits_bytes
from conftest import ROOT

# The same small float64 model and micro-batch (with masked targets) as the chunked loss's tests.
from test_chunked_loss import _model_and_batch  # noqa: E402


def _grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch) / 7.0  # a scale, as train_step divides by the token count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_relative_error(got: dict, want: dict) -> float:
    return max(float((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
               for n, g in want.items())


@pytest.mark.parametrize("chunk_tokens", [1, 7, 72, 1000])
def test_fused_gradients_equal_the_standard_loss_in_float64(chunk_tokens):
    """Chunks that do and do not divide the 72 tokens; ignored targets inside a chunk."""
    model, batch = _model_and_batch()
    loss, grads = _grads(model, batch, lm_loss_sum)
    fused_loss, fused = _grads(model, batch, FusedLinearCrossEntropy(chunk_tokens, compile=False))
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert _max_relative_error(fused, grads) <= 1e-12


def test_a_frozen_lm_head_gets_no_gradient_and_the_rest_the_standard_ones(monkeypatch):
    """LoRA freezes the lm_head: the fused kernel then computes no weight gradient at all (no
    grad.T @ h matmul: counted, it would be one per chunk) and every trainable parameter's
    gradient still equals the standard loss's (float64)."""
    model, batch = _model_and_batch()
    model.lm_head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    (lm_loss_sum(model, batch) / 7.0).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    vocab, width = model.lm_head.weight.shape
    products = []  # the shapes of the kernel's matmuls: (chunk, vocab) logits, (vocab, width) dW
    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        out = real_matmul(a, b)
        products.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    (FusedLinearCrossEntropy(7, compile=False)(model, batch) / 7.0).backward()
    monkeypatch.undo()
    assert (7, vocab) in products and (vocab, width) not in products
    assert model.lm_head.weight.grad is None
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and _max_relative_error(got, want) <= 1e-12


@pytest.mark.slow  # inductor compiles the chunk function
def test_compiled_kernel_equals_the_eager_one_in_float64():
    """The product path: the chunk function compiled (inductor) gives the standard gradients;
    its compile time is recorded."""
    model, batch = _model_and_batch(seed=1)
    loss, grads = _grads(model, batch, lm_loss_sum)
    kernel = FusedLinearCrossEntropy(32)
    fused_loss, fused = _grads(model, batch, kernel)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert _max_relative_error(fused, grads) <= 1e-12
    assert kernel.compile_seconds is not None and kernel._compiled is not None  # not eager


def test_evaluation_gives_the_standard_loss_without_gradients():
    model, batch = _model_and_batch(seed=2)
    with torch.no_grad():
        want = lm_loss_sum(model, batch)
        got = FusedLinearCrossEntropy(10, compile=False)(model, batch)
    assert not got.requires_grad
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_chunk_function_against_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(5, 11, dtype=torch.float64)
    targets = torch.tensor([3, IGNORE_INDEX, 0, 10, 7])
    loss, grad = loss_and_grad(logits, targets)
    log_probs = torch.log_softmax(logits, dim=-1)
    keep = targets != IGNORE_INDEX
    assert loss.item() == pytest.approx(-log_probs[keep, targets[keep]].sum().item(), rel=1e-14)
    want = log_probs.exp()
    want[keep, targets[keep]] -= 1
    want[~keep] = 0
    assert torch.allclose(grad, want, rtol=0, atol=1e-15)


def test_train_step_with_the_fused_kernel_equals_the_standard_step():
    """Two micro-batches, token-exact normalisation: the clipped, applied update is the same."""
    precision = Precision("fp32", "cpu", torch.amp.GradScaler("cpu", enabled=False))
    results = []
    for loss_sum_fn in (lm_loss_sum, FusedLinearCrossEntropy(16, compile=False)):
        model, first = _model_and_batch()
        _, second = _model_and_batch(seed=5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = train_step(model, optimizer, [first, second], precision=precision,
                           clip_norm=0.5, loss_sum_fn=loss_sum_fn)
        results.append((float(stats.loss), float(stats.grad_norm),
                        torch.cat([p.detach().flatten() for p in model.parameters()])))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert norm_b == pytest.approx(norm_a, rel=1e-12)
    assert torch.allclose(params_b, params_a, rtol=0, atol=1e-13)


def test_auto_uses_the_fused_kernel_from_its_vocabulary_up_and_never_under_fsdp():
    assert resolve_loss_kernel("auto", FUSED_MIN_VOCAB, "ddp", 4) == "fused"
    assert resolve_loss_kernel("auto", FUSED_MIN_VOCAB - 1, "ddp", 1) == "standard"
    assert resolve_loss_kernel("auto", 50304, "fsdp", 2) == "standard"
    assert resolve_loss_kernel("auto", 50304, "ddp", 1, "cuda") == "standard"  # bench_gpu
    assert resolve_loss_kernel("auto", 50304, "ddp", 1, "cpu") == "fused"
    assert resolve_loss_kernel("standard", 50304, "ddp", 1) == "standard"
    with pytest.raises(UsageError, match="loss_kernel = 'fused'.*fsdp"):
        resolve_loss_kernel("fused", 50304, "fsdp", 2)
    assert isinstance(make_loss_sum_fn(0, "fused"), FusedLinearCrossEntropy)


def test_memory_model_fused_logits_term():
    """The fused kernel's loss memory is far below the standard 12 V bytes per token at a large
    vocabulary, and still grows with the micro-batch (the hidden states' gradient)."""
    dims = ModelDims(vocab_size=50304, seq_len=256, n_layer=4, d_model=384, n_head=6)
    standard = logits_bytes(dims, Setup(16, precision="bf16"))
    fused = logits_bytes(dims, Setup(16, precision="bf16", loss_kernel="fused"))
    assert standard == 12 * 50304 * 16 * 256
    assert fused < standard / 3
    assert logits_bytes(dims, Setup(32, precision="bf16", loss_kernel="fused")) > fused


@pytest.mark.slow  # torchrun: a 1- and a 2-rank run
def test_two_ddp_ranks_with_the_fused_kernel_equal_one_process(tiny_overrides, tmp_path):
    """`bigbatch train --nproc 2` with the fused kernel: its gradients come from the kernel's
    backward, outside the model's forward, and DDP must still reduce them once per step.
    Losses and weights after 2 SGD steps equal one process's (fp32 summation order only)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = ROOT
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        done = subprocess.run(
            [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml", *tiny_overrides,
             "--nproc", str(nproc), "--out", str(out), "--train.max_steps=2",
             "--train.eval_every=0", "--train.eval_tokens=1024", "--precision.dtype=fp32",
             "--model.loss_kernel=fused", "--optim.name=sgd"],
            cwd=root, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "loss: fused" in done.stdout
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        runs[nproc] = ([r["loss"] for r in rows if "loss" in r],
                       load_file(str(out / "model.safetensors")))
    (loss1, weights1), (loss2, weights2) = runs[1], runs[2]
    assert len(loss1) == 2
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for name, tensor in weights1.items():
        torch.testing.assert_close(weights2[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
