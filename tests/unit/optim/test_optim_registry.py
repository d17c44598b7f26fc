"""The optimizer registry (optim/registry.py), a combination's container (container.py), and the
schedule over each parameter group's own base lr (schedule.py `set_learning_rates`).

Invariants:
- every named entry builds the plain torch optimizer it names (its numerics and checkpoints are
  torch's own): two groups, weight decay on >= 2-D weights only, base lr `optim.lr` for both;
- the registry and the config room import without torch (the --nproc launcher never loads it),
  and `optim.name` is checked against the registry, so an entry added there is a valid name;
- a combination (test-only: SGD with momentum on the matrices at 10x the lr, AdamW on the rest)
  is one optimizer to train_step (both parts move their parameters and keep their own state), to
  GradScaler (unscale_ and step, an overflow skips both), and to the checkpoint code (saved and
  reloaded, the run continues bit for bit, base lrs kept), and the planner counts its state per
  parameter (1 tensor per matrix element, 2 per vector element);
- groups whose base lrs differ by 10x keep that ratio at every step of warmup, cosine decay and
  a batch ramp, and the lr of the `optim.lr` group is exactly `step_learning_rate`'s;
- an optimizer state saved before base lrs existed loads, and the run continues as if it never
  stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import subprocess
import sys

import pytest
import torch

from bigbatch.batch import MicroBatch, split_batch
from bigbatch.config.files import load_config
from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.engine.batch_schedule import build_batch_schedule
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim.container import OptimizerContainer
from bigbatch.optim.large_batch import LAMB, LARS
from bigbatch.optim.registry import (
    OPTIMIZERS,
    Part,
    build_adamw,
    build_optimizer,
    build_sgd,
    combine,
    is_matrix,
    parameter_groups,
    trainable_parameters,
)
from bigbatch.optim.schedule import set_learning_rates, step_learning_rate
from bigbatch.planning.memory import Calibration, ModelDims, Setup, estimate_memory
from bigbatch.planning.planner import count_optimizer_state
from bigbatch.run.checkpoint_state import load_optimizer_state, optimizer_state
from small_runs import RECIPE

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
SHAPE = GPTShape(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16)
FP32 = make_precision(PrecisionConfig(dtype="fp32"), CPU)


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE)


def batch(step: int) -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 2, SHAPE.seq_len), generator=generator)
    return [MicroBatch(tokens[0], tokens[1])]


def step(net: GPT, optimizer, cfg: OptimConfig, number: int) -> float:
    """One optimizer step as fit() takes it: the schedule's lrs, then train_step."""
    lr = set_learning_rates(optimizer, cfg, batch_tokens=32, tokens_end=32 * (number + 1),
                            full_batch_tokens=32, max_steps=10)
    train_step(net, optimizer, batch(number), precision=FP32, clip_norm=1.0)
    return lr


def sgd_at_ten_times(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return build_sgd(params, dataclasses.replace(cfg, lr=10 * cfg.lr), device)


@pytest.fixture
def mixed(monkeypatch) -> OptimConfig:
    """A test-only combination: SGD with momentum on the matrices (base lr 10 x optim.lr),
    AdamW on the rest (base lr optim.lr)."""
    monkeypatch.setitem(OPTIMIZERS, "sgd+adamw", combine(
        Part(sgd_at_ten_times, state_tensors=1, takes=is_matrix),
        Part(build_adamw, state_tensors=2)))
    return OptimConfig(name="sgd+adamw", lr=1e-3, warmup_steps=3)


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("lamb", LAMB),
                                        ("lars", LARS), ("sgd", torch.optim.SGD)])
def test_each_entry_builds_the_plain_optimizer_it_names(name, kind):
    net = model()
    optimizer = build_optimizer(net, OptimConfig(name=name, lr=2e-3, weight_decay=0.1), CPU)
    assert type(optimizer) is kind
    matrices, vectors = optimizer.param_groups
    assert all(p.dim() >= 2 for p in matrices["params"]) and matrices["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    assert len(matrices["params"]) + len(vectors["params"]) == len(list(net.parameters()))
    if name in ("lamb", "lars"):
        assert (matrices["trust_ratio"], vectors["trust_ratio"]) == (True, False)
    assert optimizer.base_lrs == [2e-3, 2e-3]
    assert "base_lr" not in str(optimizer.state_dict()["param_groups"])


def test_the_registry_and_the_config_import_without_torch():
    code = ("import sys; import bigbatch.optim.registry, bigbatch.config.sections, "
            "bigbatch.config.files; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_optim_name_is_checked_against_the_registry(mixed):
    with pytest.raises(UsageError, match=r"optim.name = 'nope' is invalid: one of \('adamw', "
                                         r"'lamb', 'lars', 'muon', 'sgd', 'sgd\+adamw'\)"):
        OptimConfig(name="nope")
    assert OptimConfig(name="sgd+adamw").name == "sgd+adamw"


def test_a_combination_steps_both_parts_as_one_optimizer(mixed):
    net = model()
    optimizer = build_optimizer(net, mixed, CPU)
    assert isinstance(optimizer, OptimizerContainer)
    sgd, adamw = optimizer.optimizers
    assert type(sgd) is torch.optim.SGD and type(adamw) is torch.optim.AdamW
    assert optimizer.param_groups == [*sgd.param_groups, *adamw.param_groups]  # empty groups go
    assert all(p.dim() >= 2 for g in sgd.param_groups for p in g["params"])
    assert all(p.dim() < 2 for g in adamw.param_groups for p in g["params"])
    assert optimizer.base_lrs == [10 * 1e-3, 1e-3]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    step(net, optimizer, mixed, 0)
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert all(set(sgd.state[p]) == {"momentum_buffer"} for p in sgd.param_groups[0]["params"])
    assert all({"exp_avg", "exp_avg_sq"} <= set(adamw.state[p])
               for g in adamw.param_groups for p in g["params"])
    assert len(optimizer.state) == len(before)
    assert all(p.grad is None for p in net.parameters())  # zero_grad reached both parts


def test_grad_scaler_unscales_and_steps_a_combination(mixed):
    """A power-of-2 loss scale is exact: the scaled, unscaled step equals the plain one; an
    inf gradient in either part skips both parts' steps."""
    plain_net, scaled_net = model(), model()
    plain, scaled = build_optimizer(plain_net, mixed, CPU), build_optimizer(scaled_net, mixed, CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for net, optimizer in ((plain_net, plain), (scaled_net, scaled)):
        micro = batch(0)[0]
        loss = torch.nn.functional.cross_entropy(net(micro.inputs).flatten(0, 1),
                                                 micro.targets.flatten())
        if optimizer is plain:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
    for (_, a), (_, b) in zip(plain_net.named_parameters(), scaled_net.named_parameters(),
                              strict=True):
        assert torch.equal(a, b)
    scaled.zero_grad()
    before = {n: p.detach().clone() for n, p in scaled_net.named_parameters()}
    for p in scaled_net.parameters():
        p.grad = torch.ones_like(p)
    next(p for p in scaled_net.parameters() if p.dim() == 1).grad[0] = float("inf")
    scaler.unscale_(scaled)
    scaler.step(scaled)
    assert all(torch.equal(p, before[n]) for n, p in scaled_net.named_parameters())


def test_a_combination_saves_and_reloads_through_the_checkpoint_code(mixed):
    net = model()
    optimizer = build_optimizer(net, mixed, CPU)
    for number in range(2):
        step(net, optimizer, mixed, number)
    buffer = io.BytesIO()  # as on disk: optimizer.pt is torch.save of this state
    torch.save(optimizer_state(net, optimizer), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "blocks.0.attn.qkv.weight" in saved["state"]  # keyed by parameter names
    clone = copy.deepcopy(net)
    restored = build_optimizer(clone, mixed, CPU)
    load_optimizer_state(clone, restored, saved)
    assert restored.base_lrs == [10 * 1e-3, 1e-3]
    for number in range(2, 4):
        lrs = [step(n, o, mixed, number) for n, o in ((net, optimizer), (clone, restored))]
        assert lrs[0] == lrs[1]
        assert [g["lr"] for g in restored.param_groups] == \
            [g["lr"] for g in optimizer.param_groups]
    for (_, a), (_, b) in zip(net.named_parameters(), clone.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_planner_counts_a_combinations_state_per_parameter(mixed, tiny_overrides):
    cfg = load_config(RECIPE, [*tiny_overrides, "--optim.name=sgd+adamw"])
    dims = ModelDims(cfg.data.vocab_size, cfg.data.seq_len, cfg.model.n_layer,
                     cfg.model.d_model, cfg.model.n_head)
    net = GPT(GPTShape(dims.vocab_size, dims.seq_len, dims.n_layer, dims.n_head, dims.d_model))
    params = trainable_parameters(net)
    matrices = sum(p.numel() for _, p in params if p.dim() >= 2)
    vectors = sum(p.numel() for _, p in params if p.dim() < 2)
    assert count_optimizer_state(cfg, dims) == 1 * matrices + 2 * vectors
    setup = Setup(4, optimizer="sgd+adamw", optimizer_state_elements=matrices + 2 * vectors)
    assert estimate_memory(dims, setup, Calibration(0)).optimizer_state == \
        4 * (matrices + 2 * vectors)
    with pytest.raises(ValueError, match="count it on the model"):
        estimate_memory(dims, Setup(4, optimizer="sgd+adamw"), Calibration(0))


def test_groups_keep_the_ratio_of_their_base_lrs_through_warmup_decay_and_a_ramp(mixed):
    """Driven by set_learning_rates, the call fit() makes, over a ramped batch with sqrt lr
    scaling: the 10x group stays 10x (to 1e-12) and the optim.lr group's lr is exactly
    step_learning_rate's (the float operations of before)."""
    cfg = load_config(RECIPE, ["--data.seq_len=64", "--batch.micro_batch_size=4",
                               "--batch.global_tokens=4096", "--train.max_steps=20",
                               "--batch.ramp_tokens=30000", "--batch.ramp_start_tokens=512",
                               "--optim.name=sgd+adamw", "--optim.warmup_steps=4",
                               "--optim.lr_scaling=sqrt", "--optim.decay=cosine"])
    schedule = build_batch_schedule(cfg, split_batch(4096, 64, 4))
    optimizer = build_optimizer(model(), cfg.optim, CPU)
    tokens, micro_steps, seen = 0, 0, []
    while tokens < schedule.total_tokens:
        shape = schedule.shape(tokens, None, micro_steps)
        args = dict(batch_tokens=shape.global_tokens, tokens_end=tokens + shape.global_tokens,
                    full_batch_tokens=4096, max_steps=20)
        logged = set_learning_rates(optimizer, cfg.optim, **args)
        fast, slow = (group["lr"] for group in optimizer.param_groups)
        assert logged == slow == step_learning_rate(cfg.optim, **args)
        assert fast == pytest.approx(10 * slow, rel=1e-12)
        seen.append((shape.global_tokens, slow))
        tokens += shape.global_tokens
        micro_steps = shape.num_micro_steps
    batches, lrs = zip(*seen, strict=True)
    assert len(set(batches)) > 2  # the batch ramped
    peak = max(lrs)
    assert lrs.index(peak) not in (0, len(lrs) - 1)  # warmup up to the peak, then decay
    assert lrs[-1] < peak / 2


def test_an_optimizer_state_from_before_base_lrs_loads_and_the_run_continues():
    """What the old engine/optim.py built (AdamW over the two groups, no base lr anywhere) and
    the old loop did (one lr in every group): its state loads into the registry's AdamW, and
    the continued run equals the old one continued, bit for bit."""
    cfg = OptimConfig(name="adamw", decay="cosine", warmup_steps=3)  # what the old engine ran
    old_net = model()
    old = torch.optim.AdamW(parameter_groups(trainable_parameters(old_net), cfg.weight_decay),
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)

    def old_step(number: int) -> None:
        lr = step_learning_rate(cfg, batch_tokens=32, tokens_end=32 * (number + 1),
                                full_batch_tokens=32, max_steps=10)
        for group in old.param_groups:
            group["lr"] = lr
        train_step(old_net, old, batch(number), precision=FP32, clip_norm=1.0)

    for number in range(2):
        old_step(number)
    saved = copy.deepcopy(optimizer_state(old_net, old))
    assert all(set(group) - {"params"} <= set(old.param_groups[0]) for group in
               saved["param_groups"])
    new_net = copy.deepcopy(old_net)
    new = build_optimizer(new_net, cfg, CPU)
    load_optimizer_state(new_net, new, saved)
    assert new.base_lrs == [cfg.lr, cfg.lr]
    for number in range(2, 5):
        old_step(number)
        step(new_net, new, cfg, number)
    for (_, a), (_, b) in zip(old_net.named_parameters(), new_net.named_parameters(),
                              strict=True):
        assert torch.equal(a, b)
