"""Non-finite gradients in `train_step`: no update, and (fp16) the loss scale backs off.

Invariants, for a step whose gradients hold an inf or a NaN:
- every parameter is bitwise what it was, and the optimizer made no state (AdamW's step count
  and moments are created on the first real update, so an empty state proves step() never ran);
- `StepStats.skipped` is True and the gradients are zeroed for the next step;
- fp16: the loss scale is multiplied by exactly `precision.backoff_factor`;
- the next step with finite gradients updates the parameters (and fp16 grows the scale after
  `growth_interval` good steps).
The fp16 runs use CPU autocast and `torch.amp.GradScaler("cpu")`: the same code path as CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim.registry import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


def gpt_and_batches(num_micro_batches: int = 2):
    torch.manual_seed(0)
    model = GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32))
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(num_micro_batches):
        tokens = torch.randint(0, 64, (2, 17), generator=generator)
        batches.append(MicroBatch(tokens[:, :-1], tokens[:, 1:]))
    return model, batches


def inf_on_micro_batch(bad: MicroBatch):
    """A loss whose gradient is infinite on one micro-batch only."""
    def loss_sum_fn(model, micro_batch):
        loss = lm_loss_sum(model, micro_batch)
        return loss * float("inf") if micro_batch is bad else loss
    return loss_sum_fn


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_untouched(model, before: list[torch.Tensor], optimizer) -> None:
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert len(optimizer.state) == 0  # AdamW never stepped: no moments, no step count
    assert all(p.grad is None for p in model.parameters())


def assert_updated(model, before: list[torch.Tensor]) -> None:
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert all(changed), changed  # every tensor has a gradient here, so every one moves


def test_fp16_injected_inf_skips_the_step_and_backs_off_the_scale():
    model, batches = gpt_and_batches()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), CPU)
    cfg = PrecisionConfig(dtype="fp16", init_scale=2.0**12, backoff_factor=0.25,
                          growth_factor=2.0, growth_interval=1)
    precision = make_precision(cfg, CPU)
    before = snapshot(model)

    stats = train_step(model, optimizer, batches, precision=precision, clip_norm=1.0,
                       loss_sum_fn=inf_on_micro_batch(batches[1]))
    assert stats.skipped
    assert not math.isfinite(float(stats.grad_norm))
    assert_untouched(model, before, optimizer)
    assert stats.loss_scale == 2.0**12 * 0.25
    assert precision.scaler.get_scale() == 2.0**12 * 0.25

    stats = train_step(model, optimizer, batches, precision=precision, clip_norm=1.0)
    assert not stats.skipped
    assert math.isfinite(float(stats.grad_norm))
    assert_updated(model, before)
    assert stats.loss_scale == 2.0**12 * 0.25 * 2.0  # growth_interval = 1 good step


def test_fp16_scale_too_large_overflows_naturally_and_backs_off():
    """No injection: 2^40 times the loss overflows fp16 activation gradients (max 65504)."""
    model, batches = gpt_and_batches()
    optimizer = build_optimizer(model, OptimConfig(), CPU)
    precision = make_precision(PrecisionConfig(dtype="fp16", init_scale=2.0**40), CPU)
    before = snapshot(model)
    stats = train_step(model, optimizer, batches, precision=precision)
    assert stats.skipped
    assert_untouched(model, before, optimizer)
    assert stats.loss_scale == 2.0**40 * PrecisionConfig().backoff_factor


def test_fp16_good_step_keeps_the_scale_until_growth_interval():
    model, batches = gpt_and_batches()
    optimizer = build_optimizer(model, OptimConfig(), CPU)
    precision = make_precision(PrecisionConfig(dtype="fp16", init_scale=2.0**10,
                                               growth_interval=2), CPU)
    before = snapshot(model)
    scales = [train_step(model, optimizer, batches, precision=precision).loss_scale
              for _ in range(2)]
    assert scales == [2.0**10, 2.0**11]
    assert_updated(model, before)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_update_without_scaling(dtype, bad_value):
    """bf16 and fp32 have no scaler: the non-finite norm alone must stop the update."""
    model, batches = gpt_and_batches()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), CPU)
    precision = make_precision(PrecisionConfig(dtype=dtype), CPU)
    assert not precision.scaling
    before = snapshot(model)
    # Poison one parameter's gradient directly, as a bad kernel or data would.
    hook = model.ln_f.weight.register_hook(lambda grad: torch.full_like(grad, bad_value))
    stats = train_step(model, optimizer, batches, precision=precision, clip_norm=1.0,
                       clip_value=0.5)
    hook.remove()
    assert stats.skipped
    assert stats.loss_scale == 1.0
    assert_untouched(model, before, optimizer)

    stats = train_step(model, optimizer, batches, precision=precision, clip_norm=1.0)
    assert not stats.skipped
    assert_updated(model, before)


def test_auto_is_bf16_where_the_cpu_multiplies_it_natively_and_fp32_elsewhere(monkeypatch):
    """precision.dtype = "auto" (the default) reads the CPU's capability: without AVX-512 BF16
    or AMX, autocast's bf16 matmuls take a reference loop some 50x slower than fp32, so auto is
    fp32 there, and an explicit bf16 or fp16 is kept but warned about."""
    from bigbatch.engine.precision import resolve_dtype, slow_autocast_warning

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert resolve_dtype("auto", CPU)[0] == "fp32"
    assert make_precision(PrecisionConfig(), CPU).dtype == "fp32"  # the default is auto
    for explicit in ("bf16", "fp16"):
        assert resolve_dtype(explicit, CPU) == (explicit, "")  # kept as asked, but
        assert "'fp32'" in slow_autocast_warning(explicit, CPU)  # warned about
    assert resolve_dtype("fp32", CPU) == ("fp32", "")
    assert slow_autocast_warning("fp32", CPU) == slow_autocast_warning("auto", CPU) == ""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto", CPU) == ("bf16", "auto")
    assert resolve_dtype("bf16", CPU) == ("bf16", "") and not slow_autocast_warning("bf16", CPU)
    assert make_precision(PrecisionConfig(), CPU).dtype == "bf16"


def test_a_run_records_the_dtype_auto_chose(tiny_overrides, tmp_path, monkeypatch):
    """config.toml holds the resolved dtype (a resume or a report reads what ran, not "auto"),
    and the start-up line says why."""
    import contextlib
    import io

    from bigbatch.config.files import load_config
    from bigbatch.run.train import train
    from small_runs import small_config

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(small_config(tiny_overrides, "--train.max_steps=1"), tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.toml").precision.dtype == "fp32"
    assert "precision: fp32 (auto: this CPU (" in out.getvalue()
