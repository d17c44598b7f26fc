"""The CUDA path on a real GPU (`@pytest.mark.cuda`: skipped, with the reason, where torch sees
none; `make gpu-check` runs these first).

Invariants:
- a rank binds cuda:LOCAL_RANK before anything else touches CUDA, and its every parameter and
  optimizer state lives there;
- bf16 and fp16 steps (autocast; fp16 with loss scaling) give the fp32 step's loss to low
  precision, and update the weights;
- the fused loss compiles (Triton) and equals the eager kernel;
- the planner's probe reports max_memory_allocated for a run that fits, and an induced
  out-of-memory as "out of memory" (caught in the probe, not a crash);
- a run stopped by a signal and resumed on the GPU (CUDA tensors, CUDA RNG with dropout)
  logs what an uninterrupted run logs;
- FSDP2 on one GPU (a 1-rank NCCL group) shards per layer and steps as the unwrapped model,
  with SGD and with muon (sharded momentum, bf16 Newton-Schulz);
- document masking's CUDA path (flex_attention with a block mask, compiled) gives the logits and
  gradients of the boolean-mask SDPA path.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.data.packing import document_positions
from bigbatch.engine.fused_loss import FusedLinearCrossEntropy, loss_and_grad
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim.registry import build_optimizer
from bigbatch.parallel.process_group import DistInfo, init_process_group
from bigbatch.run.train import resolve_device

pytestmark = pytest.mark.cuda
SHAPE = GPTShape(vocab_size=512, seq_len=64, n_layer=2, n_head=4, d_model=64)


def tiny_gpt(device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE).to(device)


def micro_batches(k: int, device: torch.device, micro_batch_size: int = 4) -> list[MicroBatch]:
    gen = torch.Generator().manual_seed(k)
    out = []
    for _ in range(k):
        tokens = torch.randint(0, SHAPE.vocab_size, (micro_batch_size, SHAPE.seq_len + 1),
                               generator=gen)
        out.append(MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()).to(device))
    return out


def test_every_parameter_and_optimizer_state_on_the_ranks_gpu():
    device = resolve_device("auto", DistInfo())
    init_process_group(DistInfo(), device)
    assert device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    model = tiny_gpt(device)
    optimizer = build_optimizer(model, OptimConfig(), device)
    train_step(model, optimizer, micro_batches(2, device),
               precision=make_precision(PrecisionConfig(dtype="bf16"), device))
    assert {p.device for p in model.parameters()} == {device}
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert states and {t.device for t in states if t.dim() > 0} == {device}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_step_matches_fp32(dtype):
    device = torch.device("cuda", 0)
    losses, moved = {}, {}
    for name in ("fp32", dtype):
        model = tiny_gpt(device)
        before = [p.detach().clone() for p in model.parameters()]
        # A moderate first loss scale: this test is about the arithmetic, not the scaler's search.
        precision = make_precision(PrecisionConfig(dtype=name, tf32=False, init_scale=2.0**10),
                                   device)
        stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           micro_batches(3, device), precision=precision)
        assert not stats.skipped and math.isfinite(float(stats.loss))
        losses[name] = float(stats.loss)
        moved[name] = max(float((p - b).abs().max()) for p, b in zip(model.parameters(), before,
                                                                   strict=True))
    assert abs(losses[dtype] - losses["fp32"]) / losses["fp32"] < 1e-2
    assert moved[dtype] > 0.5 * moved["fp32"]


def test_fused_loss_compiles_with_triton_and_equals_eager():
    pytest.importorskip("triton")
    device = torch.device("cuda", 0)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(512, 4096, device=device, generator=gen)
    targets = torch.randint(0, 4096, (512,), device=device, generator=gen)
    targets[::7] = -100
    kernel = FusedLinearCrossEntropy()
    loss, grad = kernel.loss_and_grad(logits, targets)
    assert kernel._compiled is not None and kernel.compile_seconds is not None  # no fallback
    want_loss, want_grad = loss_and_grad(logits, targets)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_probe_reports_cuda_peak_and_catches_out_of_memory():
    from bigbatch.planning.memory import ModelDims
    from bigbatch.planning.probe import ProbeRequest, run_probe

    quick = {"num_steps": 2, "min_timed_seconds": 0.0, "max_steps": 2, "device": "cuda:0"}
    dims = ModelDims(SHAPE.vocab_size, SHAPE.seq_len, SHAPE.n_layer, SHAPE.d_model, SHAPE.n_head)
    fits = run_probe(ProbeRequest(dims, 4, **quick))
    assert fits.ok, fits.error
    # At least the weights, gradients and AdamW's two moments (16 bytes per parameter) were
    # allocated; far less than a GiB for this model.
    assert 16 * dims.num_parameters < fits.peak_bytes < 2**30
    # Logits of 16384 x 1024 tokens x 50304 would need petabytes: the probe must say so.
    huge = ModelDims(50304, 1024, 1, 64, 4)
    failed = run_probe(ProbeRequest(huge, 16384, **quick))
    assert not failed.ok and failed.error.startswith("out of memory"), failed.error


@pytest.fixture(scope="module")
def own_text(tmp_path_factory) -> list[str]:
    """Overrides for a small corpus written here (this Python's own sources, ~400 KB): a GPU
    machine runs a checkout without the ../shared beside it."""
    root = tmp_path_factory.mktemp("cuda-corpus")
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    text, size = [], 0
    for path in sources:
        text.append(path.read_text(errors="replace"))
        size += len(text[-1])
        if size > 400_000:
            break
    (root / "text.txt").write_text("\n".join(text))
    return [f"--data.path={root / 'text.txt'}", f"--data.cache_dir={root / 'cache'}"]


def test_resume_on_cuda_equals_an_uninterrupted_run(own_text, tmp_path):
    from bigbatch.run.train import train
    from small_runs import StopAfter, metric_rows, small_config

    tiny_overrides = own_text

    # fp32 without TF32 and the explicit attention kernel, so both runs use the same
    # deterministic kernels; dropout on (the CUDA RNG must be restored).
    extra = ("--train.device=cuda", "--precision.dtype=fp32", "--precision.tf32=false",
             "--model.attention=explicit")
    straight = train(small_config(tiny_overrides, *extra), tmp_path / "straight", verbose=False)
    cfg = small_config(tiny_overrides, *extra, "--checkpoint.every_steps=2")
    first = train(cfg, tmp_path / "resumed", verbose=False, preemption=StopAfter(3))
    assert (first.state.step, first.exit_code) == (3, 128 + signal.SIGTERM)
    from safetensors.torch import load_file

    saved = next((tmp_path / "resumed" / "checkpoints").glob("step-*")) / "rng.safetensors"
    assert "rank0.torch_cuda" in load_file(str(saved))  # each rank's own, rank-prefixed
    train(cfg, tmp_path / "resumed", verbose=False, resume="auto")
    rows, want = metric_rows(tmp_path / "resumed"), metric_rows(straight.out_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for got, expected in zip(rows, want, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in expected:
                # A forgotten RNG state changes the dropout masks, and the losses far beyond this.
                assert got[key] == pytest.approx(expected[key], rel=1e-4), (got["step"], key)


def test_fsdp_on_one_gpu_shards_per_layer_and_steps_as_the_plain_model(monkeypatch):
    import torch.distributed as dist

    from bigbatch.parallel.wrap import fsdp_units, shard

    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", "29517")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        plain, sharded = tiny_gpt(device), shard(tiny_gpt(device), device, 1)
        assert len(fsdp_units(sharded)) == SHAPE.n_layer + 1
        precision = make_precision(PrecisionConfig(dtype="fp32", tf32=False), device)
        for model in (plain, sharded):
            train_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                       micro_batches(2, device), precision=precision)
        for (name, a), (_, b) in zip(plain.named_parameters(), sharded.named_parameters(),
                                     strict=True):
            torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-5, atol=1e-6,
                                       msg=name)
    finally:
        dist.destroy_process_group()


def test_fsdp_muon_on_one_gpu_steps_as_the_plain_model_with_muon(monkeypatch):
    """optim.name = "muon" under FSDP2 (a 1-rank NCCL group: the gather, Newton-Schulz in bf16
    as on any GPU, the scatter) moves the weights as the unwrapped model's muon does. Bound: the
    weights' change agrees to 2^-7 of its largest element: bf16 keeps 8 bits, so an ulp of
    difference in a gradient (FSDP's reduce-scatter against none) can round Newton-Schulz's
    result one bf16 step apart; a wrong algorithm (a lost momentum, a shard's lr) is ~1e-1."""
    import torch.distributed as dist

    from bigbatch.parallel.wrap import shard

    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", "29518")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        plain, sharded = tiny_gpt(device), shard(tiny_gpt(device), device, 1)
        before = {n: p.detach().clone() for n, p in plain.named_parameters()}
        precision = make_precision(PrecisionConfig(dtype="fp32", tf32=False), device)
        optimizers = []
        for model in (plain, sharded):
            optimizer = build_optimizer(model, OptimConfig(name="muon", warmup_steps=0), device)
            assert optimizer.optimizers[0].ns_dtype == torch.bfloat16
            for _ in range(2):
                train_step(model, optimizer, micro_batches(2, device), precision=precision)
            optimizers.append(optimizer)
        buffer = optimizers[1].optimizers[0].state[sharded.blocks[0].attn.qkv.weight]
        assert type(buffer["momentum_buffer"]).__name__ == "DTensor"
        for (name, a), (_, b) in zip(plain.named_parameters(), sharded.named_parameters(),
                                     strict=True):
            if name.endswith("qkv.bias"):  # AdamW's; its key third's gradient is 0 in exact
                continue  # arithmetic, so Adam turns rounding noise into full steps there
            moved, moved_sharded = a.detach() - before[name], b.full_tensor() - before[name]
            assert moved.abs().max() > 0, name
            error = (moved_sharded - moved).abs().max() / moved.abs().max()
            assert error <= 2**-7, (name, float(error))
    finally:
        dist.destroy_process_group()
def test_document_mask_flex_equals_the_boolean_mask_forward_and_backward(monkeypatch):
    """fp32 (TF32 off), rows of 256 tokens (two of flex's 128-token blocks) with documents of
    assorted lengths: the compiled flex kernel skips whole blocks, the mask path computes them."""
    device = torch.device("cuda", 0)
    # The fp32_precision API, as the product's set_tf32 uses: the legacy allow_tf32 flags, read
    # after an earlier test had set the new ones, made torch 2.11 refuse (the second GPU run).
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
    shape = GPTShape(vocab_size=512, seq_len=256, n_layer=2, n_head=4, d_model=64)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, shape.vocab_size, (4, shape.seq_len + 1), generator=gen)
    tokens[torch.rand(tokens.shape, generator=gen) < 0.02] = 0  # end-of-text: id 0 here
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    batch = MicroBatch(inputs, targets, document_positions(inputs, 0)).to(device)
    results = {}
    for use_flex in (True, False):
        torch.manual_seed(0)
        model = GPT(shape).to(device)
        assert model.uses_flex(device)
        if not use_flex:
            monkeypatch.setattr(model, "uses_flex", lambda _: False)
        logits = model(**batch.model_inputs())
        lm_loss_sum(model, batch).backward()
        results[use_flex] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    (flex_logits, flex_grads), (mask_logits, mask_grads) = results[True], results[False]
    assert torch.allclose(flex_logits, mask_logits, rtol=0, atol=1e-4)
    for name, grad in mask_grads.items():
        error = (flex_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, (name, float(error))
