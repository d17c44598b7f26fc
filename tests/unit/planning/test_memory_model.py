"""The memory model against independent oracles: the real GPT's parameter counts, the bytes a real
Block saves for backward (saved-tensor hooks), hand-computed arithmetic, and monotonicity."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from bigbatch.config.units import parse_bytes
from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT, Block, GPTShape
from bigbatch.planning.memory import (
    Calibration,
    ModelDims,
    Setup,
    allreduce_bytes_per_step,
    block_bytes_per_token,
    estimate_memory,
    growing_bytes,
)
from bigbatch.planning.probe import fit_calibration

DIMS = ModelDims(vocab_size=96, seq_len=16, n_layer=3, d_model=32, n_head=4)
ZERO = Calibration(overhead_bytes=0)


def test_parameter_counts_match_the_real_model():
    model = GPT(GPTShape(DIMS.vocab_size, DIMS.seq_len, DIMS.n_layer, DIMS.n_head, DIMS.d_model))
    assert DIMS.num_parameters == model.num_parameters()
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Linear)
              for p in m.parameters()}
    assert DIMS.linear_parameters == sum(linear.values())


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_bytes_per_token_equal_what_a_block_saves(precision, attention):
    """Unique storages saved for backward by one Block, minus its parameters (and their casts)."""
    batch, time = 2, DIMS.seq_len
    dims = ModelDims(**{**DIMS.__dict__, "attention": attention})
    block = Block(GPTShape(DIMS.vocab_size, time, 1, DIMS.n_head, DIMS.d_model), attention)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}

    def is_parameter(tensor) -> bool:
        """A parameter (or a view of one), or autocast's cast of a parameter."""
        if tensor.untyped_storage().data_ptr() in params:
            return True
        fn = tensor.grad_fn
        while fn is not None and type(fn).__name__ in ("TBackward0", "ToCopyBackward0"):
            fn = fn.next_functions[0][0]
            if type(fn).__name__ == "AccumulateGrad":
                return True
        return False

    def pack(tensor):
        if not is_parameter(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(torch.randn(batch, time, DIMS.d_model, requires_grad=True))
    activations = sum(saved.values())
    assert activations == batch * time * block_bytes_per_token(dims, precision)


def test_hand_computed_fp32_case():
    # V=96 T=16 L=3 C=32 H=4, micro-batch 2 -> N = 32 tokens, fp32 (a = 4).
    # P = (96 + 16) * 32 + 3 * (12 * 32^2 + 13 * 32) + 2 * 32 = 3584 + 38112 + 64 = 41760
    estimate = estimate_memory(DIMS, Setup(micro_batch_size=2), ZERO)
    assert DIMS.num_parameters == 41760
    assert (estimate.parameters, estimate.gradients, estimate.optimizer_state) == (
        4 * 41760, 4 * 41760, 8 * 41760)
    # block per token: 8C + 16 + 4H + 14 C a = 256 + 16 + 16 + 1792 = 2080
    # final per token: 4C + 8 + C a + 16 = 128 + 8 + 128 + 16 = 280
    assert estimate.activations == 32 * (3 * 2080 + 280)
    assert estimate.logits_and_loss == 32 * 3 * 4 * 96
    assert estimate.autocast_copies == 0 and estimate.ddp_buckets == 0


def test_bf16_counts_autocast_copies_and_ddp_buckets():
    estimate = estimate_memory(DIMS, Setup(2, precision="bf16", world_size=4), ZERO)
    assert estimate.autocast_copies == 2 * DIMS.linear_parameters
    assert estimate.ddp_buckets == 4 * DIMS.num_parameters
    sharded = estimate_memory(DIMS, Setup(2, world_size=4, strategy="fsdp"), ZERO)
    assert sharded.optimizer_state == 8 * DIMS.num_parameters // 4


def test_memory_grows_with_micro_batch_and_sequence_length():
    totals = [estimate_memory(DIMS, Setup(b), ZERO).total for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    longer = ModelDims(DIMS.vocab_size, 2 * DIMS.seq_len, DIMS.n_layer, DIMS.d_model,
                       DIMS.n_head)
    assert estimate_memory(longer, Setup(2), ZERO).total > estimate_memory(DIMS, Setup(2),
                                                                           ZERO).total


def test_checkpointing_lowers_activations_and_chunking_lowers_logits():
    plain = estimate_memory(DIMS, Setup(8), ZERO)
    every = estimate_memory(DIMS, Setup(8, checkpointing="every_n", checkpoint_every=2), ZERO)
    every_block = estimate_memory(DIMS, Setup(8, checkpointing="all"), ZERO)
    assert plain.activations > every.activations > every_block.activations
    chunked = estimate_memory(DIMS, Setup(8, loss_chunk_tokens=16), ZERO)
    assert chunked.logits_and_loss == 16 * 3 * 4 * 96 < plain.logits_and_loss


def test_fit_recovers_known_constants():
    overhead, scale = 300 * 2**20, 1.7
    points = [(Setup(b), round(estimate_memory(DIMS, Setup(b), ZERO).total - 0
                               + overhead + (scale - 1) * growing_bytes(DIMS, Setup(b))))
              for b in (1, 4, 16)]
    fitted = fit_calibration(DIMS, points, ZERO)
    assert fitted.activation_scale == pytest.approx(scale, rel=1e-6)
    assert fitted.overhead_bytes == pytest.approx(overhead, rel=1e-6)


def test_allreduce_volume_is_the_ring_formula():
    assert allreduce_bytes_per_step(DIMS, 1, "ddp") == 0
    assert allreduce_bytes_per_step(DIMS, 4, "ddp") == round(2 * 3 / 4 * 4 * DIMS.num_parameters)


@pytest.mark.parametrize("text, expected", [("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20),
                                            ("1.5GB", 1_500_000_000), (1234, 1234), ("0", 0)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6XB", "lots", -1, "GiB"])
def test_parse_bytes_rejects_bad_sizes(bad):
    with pytest.raises(UsageError, match="batch.memory_budget"):
        parse_bytes(bad)
