"""`train_step` casts the weights to bf16 once per optimizer step, not once per micro-step, and
that changes no number: the gradients are bitwise those of a per-micro-step autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigbatch.batch import MicroBatch
from bigbatch.engine.precision import Precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.model.gpt import GPT, GPTShape

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
BF16 = Precision("bf16", "cpu", torch.amp.GradScaler("cpu", enabled=False))


def model_and_batches(k: int):
    torch.manual_seed(0)
    model = GPT(SHAPE, attention="explicit")
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, SHAPE.vocab_size, (k, 2, SHAPE.seq_len + 1), generator=generator)
    return model, [MicroBatch(t[:, :-1], t[:, 1:]) for t in tokens]


class WeightCasts(TorchDispatchMode):
    """Counts dtype casts whose source is one of `params`' storages."""

    def __init__(self, params) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and \
                args[0].untyped_storage().data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 4])
def test_weights_are_cast_once_per_step(k):
    model, batches = model_and_batches(k)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with WeightCasts(model.parameters()) as casts:
        train_step(model, optimizer, batches, precision=BF16)
    # Every Linear weight and bias once (lm_head shares the token table's weight); not k times.
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert casts.count == len({id(p) for m in linear for p in m.parameters()})


def test_gradients_equal_per_micro_step_autocast_bitwise():
    model, batches = model_and_batches(4)
    count = sum(int(b.num_targets()) for b in batches)
    for batch in batches:  # the reference: autocast entered and left around each forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss_sum(model, batch)
        (loss / count).backward()
    expected = [p.grad.clone() for p in model.parameters()]

    model, batches = model_and_batches(4)
    grads = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.step = lambda: grads.update({id(p): p.grad.clone() for p in model.parameters()})
    train_step(model, optimizer, batches, precision=BF16)
    assert all(torch.equal(grads[id(p)], e) for p, e in zip(model.parameters(), expected,
                                                             strict=True))
