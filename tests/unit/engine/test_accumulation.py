"""Token-exact gradient accumulation: k micro-batches through `train_step` give the gradient of one
forward/backward over all their samples at once (token-mean loss).

The reference here is computed independently of bigbatch's loss code: `F.cross_entropy` with its
own `reduction="mean"` over the concatenated batch. The gradients `train_step` hands to the
optimizer are caught by `GradientRecorder`. Micro-batches are masked unevenly (one keeps a single
target), because that is where `mean / k` goes wrong and the global-count normalisation does not.

Error measure (as `bigbatch verify`): per tensor max|acc - ref| / max|ref|, worst over tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigbatch.batch import IGNORE_INDEX, MicroBatch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.tools.verify import GradientRecorder, max_relative_error

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, SEQ_LEN = 64, 16
# Unmasked targets per sequence of 16: uneven, one sequence with a single target. Grouped into
# k micro-batches of 8 / k sequences, every k > 1 gives micro-batches with different counts.
TARGETS_PER_SEQUENCE = [1, 16, 3, 9, 16, 2, 12, 7]
NUM_SEQUENCES = len(TARGETS_PER_SEQUENCE)


def small_gpt(dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTShape(vocab_size=VOCAB, seq_len=SEQ_LEN, n_layer=2, n_head=2, d_model=32))
    return model.to(dtype)


def unevenly_masked_samples(targets_per_sequence: list[int]) -> MicroBatch:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (len(targets_per_sequence), SEQ_LEN + 1), generator=generator)
    targets = tokens[:, 1:].clone()
    for row, keep in enumerate(targets_per_sequence):
        masked = torch.randperm(SEQ_LEN, generator=generator)[:SEQ_LEN - keep]
        targets[row, masked] = IGNORE_INDEX
    return MicroBatch(tokens[:, :-1], targets)


def split(samples: MicroBatch, k: int) -> list[MicroBatch]:
    size = len(samples.inputs) // k
    return [MicroBatch(samples.inputs[i:i + size], samples.targets[i:i + size])
            for i in range(0, len(samples.inputs), size)]


def reference_gradients(model: GPT, samples: MicroBatch) -> list[torch.Tensor]:
    """One forward/backward over every sample, PyTorch's own token mean."""
    model.zero_grad(set_to_none=True)
    logits = model(samples.inputs)
    F.cross_entropy(logits.flatten(0, 1), samples.targets.flatten(), ignore_index=IGNORE_INDEX,
                    reduction="mean").backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def train_step_gradients(model: GPT, micro_batches: list[MicroBatch],
                         loss_sum_fn=lm_loss_sum) -> list[torch.Tensor]:
    recorder = GradientRecorder(model.parameters())
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, recorder, micro_batches, precision=precision,
                       loss_sum_fn=loss_sum_fn)
    assert not stats.skipped
    assert int(stats.num_targets) == sum(int(mb.num_targets()) for mb in micro_batches)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    return recorder.recorded


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_accumulated_gradients_equal_one_big_batch_float64(k):
    model = small_gpt(torch.float64)
    samples = unevenly_masked_samples(TARGETS_PER_SEQUENCE)
    micro_batches = split(samples, k)
    counts = [int(mb.num_targets()) for mb in micro_batches]
    assert k == 1 or len(set(counts)) > 1, counts
    assert min(counts) == 1 or k < 8
    expected = reference_gradients(model, samples)
    actual = train_step_gradients(model, micro_batches)
    assert len(actual) == len(list(model.parameters()))
    assert max_relative_error(actual, expected) <= 1e-6


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_accumulated_gradients_fp32_within_a_rounding_bound(k):
    """fp32 bound: both sides add the same per-token gradient terms, in different groupings and
    orders (k partial sums then a running sum, against one sum; matmul kernels also block a
    batch of B rows differently from B / k rows). Every gradient element is such a sum over at
    most n = (sequences x seq_len) token positions; rounding errors of a sum of n terms grow like
    sqrt(n) * eps when they do not correlate (Higham, ch. 4; the worst case is n * eps). We assert
    16 * eps * sqrt(n) = 2.2e-5 for n = 128. Measured: 0 for k = 1 (the same kernels), 4.0e-7 to
    4.4e-7 (3.4-3.7 eps) for k = 2, 4, 8; the `mean / k` bug below gives 0.18 to 3.0, four orders
    of magnitude above the bound."""
    model = small_gpt(torch.float32)
    samples = unevenly_masked_samples(TARGETS_PER_SEQUENCE)
    expected = reference_gradients(model, samples)
    actual = train_step_gradients(model, split(samples, k))
    bound = 16 * torch.finfo(torch.float32).eps * math.sqrt(samples.targets.numel())
    assert max_relative_error(actual, expected) <= bound


def naive_mean_over_k(total_targets: int, k: int):
    """`mean / k` routed through train_step: it divides each micro-batch's returned sum by the
    step's target count, so returning mean_i * total / k makes the step use sum_i mean_i / k."""
    def loss_sum_fn(model, micro_batch):
        return lm_loss_sum(model, micro_batch) / micro_batch.num_targets() * total_targets / k
    return loss_sum_fn


@pytest.mark.parametrize("k", [2, 8])
def test_negative_control_mean_over_k_is_wrong_when_counts_differ(k):
    """The same comparison catches the common bug: with uneven target counts, averaging the
    micro-batch means weights a 1-target micro-batch like a 16-target one."""
    model = small_gpt(torch.float64)
    samples = unevenly_masked_samples(TARGETS_PER_SEQUENCE)
    expected = reference_gradients(model, samples)
    naive = naive_mean_over_k(int(samples.num_targets()), k)
    actual = train_step_gradients(model, split(samples, k), loss_sum_fn=naive)
    assert max_relative_error(actual, expected) > 1e-2


def test_negative_control_agrees_when_counts_are_equal():
    """...and the control is about the counts: with equal counts `mean / k` is exact too."""
    model = small_gpt(torch.float64)
    samples = unevenly_masked_samples([5] * NUM_SEQUENCES)
    expected = reference_gradients(model, samples)
    naive = naive_mean_over_k(int(samples.num_targets()), 4)
    actual = train_step_gradients(model, split(samples, 4), loss_sum_fn=naive)
    assert max_relative_error(actual, expected) <= 1e-6


def test_a_micro_batch_without_targets_adds_nothing():
    """An all-masked micro-batch (possible at the end of a packed stream) contributes a zero sum
    and does not change the normaliser: the step equals the step without it."""
    model = small_gpt(torch.float64)
    samples = unevenly_masked_samples(TARGETS_PER_SEQUENCE)
    empty = MicroBatch(samples.inputs[:2], torch.full_like(samples.targets[:2], IGNORE_INDEX))
    expected = reference_gradients(model, samples)
    actual = train_step_gradients(model, [*split(samples, 4), empty])
    assert max_relative_error(actual, expected) <= 1e-6


def test_step_loss_is_the_token_mean_of_the_whole_step():
    model = small_gpt(torch.float64)
    samples = unevenly_masked_samples(TARGETS_PER_SEQUENCE)
    with torch.no_grad():
        expected = F.cross_entropy(model(samples.inputs).flatten(0, 1), samples.targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, GradientRecorder(model.parameters()), split(samples, 8),
                       precision=precision)
    assert float(stats.loss) == pytest.approx(float(expected), rel=1e-12)
