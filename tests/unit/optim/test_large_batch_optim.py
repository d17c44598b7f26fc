"""LAMB, LARS and SGD updates against the papers' equations, and the lr scaling rules.

The reference updates below are written from the papers' algorithms with plain tensor arithmetic
(no optimizer code): LAMB, You et al. 2019, Algorithm 2 (phi = identity); LARS, You et al. 2017,
Algorithm 1. Two steps each, so that the moment estimates, bias corrections and momentum carry
over. Matrices get the trust ratio and weight decay; 1-D tensors (biases, norm gains) get neither.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bigbatch.config.sections import OptimConfig
from bigbatch.optim.registry import build_optimizer
from bigbatch.optim.schedule import describe_lr_scaling, scaled_peak_lr

pytestmark = pytest.mark.usefixtures("single_thread")

LR, WD, B1, B2, EPS, MOMENTUM, ETA = 0.01, 0.1, 0.9, 0.99, 1e-6, 0.9, 0.002


class TwoTensors(nn.Module):
    """One matrix (trust ratio, decay) and one bias (neither)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64))


def gradients(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + step)
    return {"weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
            "bias": torch.randn(4, generator=generator, dtype=torch.float64)}


def run_optimizer(name: str, steps: int = 2) -> dict[str, torch.Tensor]:
    model = TwoTensors()
    cfg = OptimConfig(name=name, lr=LR, weight_decay=WD, beta1=B1, beta2=B2, eps=EPS,
                      momentum=MOMENTUM, trust_coefficient=ETA)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    for step in range(steps):
        for key, grad in gradients(step).items():
            getattr(model, key).grad = grad.clone()
        optimizer.step()
    return {key: p.detach() for key, p in model.named_parameters()}


def lamb_reference(steps: int = 2) -> dict[str, torch.Tensor]:
    params = {k: v.detach().clone() for k, v in TwoTensors().named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    for t in range(1, steps + 1):
        for key, g in gradients(t - 1).items():
            x = params[key]
            m[key] = B1 * m[key] + (1 - B1) * g
            v[key] = B2 * v[key] + (1 - B2) * g * g
            r = (m[key] / (1 - B1 ** t)) / (torch.sqrt(v[key] / (1 - B2 ** t)) + EPS)
            if key == "weight":
                u = r + WD * x
                params[key] = x - LR * (x.norm() / u.norm()) * u
            else:
                params[key] = x - LR * r
    return params


def lars_reference(steps: int = 2) -> dict[str, torch.Tensor]:
    params = {k: v.detach().clone() for k, v in TwoTensors().named_parameters()}
    velocity = {k: torch.zeros_like(x) for k, x in params.items()}
    for t in range(steps):
        for key, g in gradients(t).items():
            w = params[key]
            if key == "weight":
                local_lr = ETA * w.norm() / (g.norm() + WD * w.norm())
                velocity[key] = MOMENTUM * velocity[key] + LR * local_lr * (g + WD * w)
            else:
                velocity[key] = MOMENTUM * velocity[key] + LR * g
            params[key] = w - velocity[key]
    return params


def sgd_reference(steps: int = 2) -> dict[str, torch.Tensor]:
    """SGD with momentum and L2 decay on the matrix only (PyTorch's SGD convention)."""
    params = {k: v.detach().clone() for k, v in TwoTensors().named_parameters()}
    buf = {k: torch.zeros_like(x) for k, x in params.items()}
    for t in range(steps):
        for key, g in gradients(t).items():
            d = g + WD * params[key] if key == "weight" else g
            buf[key] = d if t == 0 else MOMENTUM * buf[key] + d
            params[key] = params[key] - LR * buf[key]
    return params


@pytest.mark.parametrize("name, reference", [("lamb", lamb_reference), ("lars", lars_reference),
                                             ("sgd", sgd_reference)])
def test_updates_match_the_papers_equations(name, reference):
    got, want = run_optimizer(name), reference()
    start = dict(TwoTensors().named_parameters())
    for key in want:
        assert not torch.equal(got[key], start[key])  # the update did something
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14)


def test_lamb_trust_ratio_makes_the_matrix_step_lr_times_its_norm():
    """The defining property: LAMB's per-layer step has norm lr * |x|, whatever the gradient's
    scale; the bias (no trust ratio) takes an Adam step instead."""
    before = TwoTensors().weight.detach()
    after = run_optimizer("lamb", steps=1)["weight"]
    assert (after - before).norm().item() == pytest.approx(LR * before.norm().item(), rel=1e-12)


def test_lamb_and_lars_state_survives_a_state_dict_round_trip():
    for name in ("lamb", "lars"):
        model = TwoTensors()
        cfg = OptimConfig(name=name, lr=LR, weight_decay=WD)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        for key, grad in gradients(0).items():
            getattr(model, key).grad = grad.clone()
        optimizer.step()
        clone = TwoTensors()
        clone.load_state_dict(model.state_dict())
        restored = build_optimizer(clone, cfg, torch.device("cpu"))
        # A deep copy, as a checkpoint on disk is: load_state_dict keeps tensors it need not cast.
        restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for m in (model, clone):
            for key, grad in gradients(1).items():
                getattr(m, key).grad = grad.clone()
        optimizer.step()
        restored.step()
        for (_, a), (_, b) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("batch, reference, rule, factor", [
    (8192, 2048, "linear", 4.0), (8192, 2048, "sqrt", 2.0), (512, 2048, "linear", 0.25),
    (512, 2048, "sqrt", 0.5), (3000, 1000, "sqrt", math.sqrt(3)), (8192, 2048, "none", 1.0)])
def test_scaling_rules(batch, reference, rule, factor):
    assert scaled_peak_lr(3e-4, rule, batch, reference) == pytest.approx(3e-4 * factor,
                                                                          rel=1e-15)


def test_scaling_is_printed_with_its_arithmetic():
    line = describe_lr_scaling(1e-3, "sqrt", 8192, 2048)
    assert line == "lr scaling: sqrt: peak lr = 0.001 x sqrt(8,192 / 2,048) = 0.002"
