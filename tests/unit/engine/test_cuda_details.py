"""CUDA details that CPU can prove: TF32 set by `precision.tf32`, batches pinned before an
asynchronous copy to a GPU, and an out-of-memory error let through the fused loss's compile
fallback (any other compile failure still falls back to the same numbers, eagerly)."""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.fused_loss import FusedLinearCrossEntropy, loss_and_grad
from bigbatch.engine.precision import make_precision


@pytest.fixture
def restore_tf32():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("tf32, mode", [(True, "tf32"), (False, "ieee")])
def test_tf32_follows_the_setting_on_cuda(restore_tf32, tf32, mode):
    torch.backends.cuda.matmul.fp32_precision = "none"
    make_precision(PrecisionConfig(dtype="fp32", tf32=tf32), torch.device("cuda", 0))
    assert torch.backends.cuda.matmul.fp32_precision == mode
    assert torch.backends.cudnn.conv.fp32_precision == mode


def test_cpu_runs_leave_tf32_alone(restore_tf32):
    torch.backends.cuda.matmul.fp32_precision = "none"
    make_precision(PrecisionConfig(dtype="fp32", tf32=True), torch.device("cpu"))
    assert torch.backends.cuda.matmul.fp32_precision == "none"


def test_batches_to_a_gpu_are_pinned_then_copied_asynchronously(monkeypatch):
    copies = []

    def pin_memory(self):
        copies.append("pin")
        return self

    def to(self, device, non_blocking=False):
        copies.append((str(device), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = MicroBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    batch.to(torch.device("cuda", 1))
    assert copies == ["pin", ("cuda:1", True)] * 2
    copies.clear()
    batch.to(torch.device("cpu"))  # pinning needs CUDA, and buys nothing on CPU
    assert copies == [("cpu", True)] * 2


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 16, (8,), generator=gen)


def test_out_of_memory_in_the_compiled_loss_propagates():
    kernel = FusedLinearCrossEntropy(compile=True)

    def out_of_memory(logits, targets):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    kernel._compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        kernel.loss_and_grad(*_inputs())
    assert kernel._compiled is out_of_memory  # not silently switched to eager


def test_other_compile_failures_still_fall_back_to_eager(capsys):
    kernel = FusedLinearCrossEntropy(compile=True)

    def no_compiler(logits, targets):
        raise RuntimeError("no C++ compiler")

    kernel._compiled = no_compiler
    loss, grad = kernel.loss_and_grad(*_inputs())
    want_loss, want_grad = loss_and_grad(*_inputs())
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert kernel._compiled is None and "running it eagerly" in capsys.readouterr().err
