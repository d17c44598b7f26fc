"""SFT with `data.packing = false`: whole examples padded per micro-batch.

Invariants: a step's micro-batches hold exactly the examples the sampler drew, each once; no
micro-batch is over `micro_batch_size x seq_len` padded tokens; every rank runs as many
micro-steps; N ranks' micro-batches together are the one-rank ones; a resumed loader draws the
next step an uninterrupted one draws. On a tiny GPT-2: padding changes no real token's logits,
accumulation over uneven padded micro-batches is the one big batch's exact mean, and the padded
validation loss is the packed one's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigbatch.batch import IGNORE_INDEX, split_batch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.loop import evaluate
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.model.hf_lm import require_packed_sequences
from bigbatch.parallel.process_group import DistInfo
from bigbatch.tasks.sft.loader import SFTLoader, eval_batches
from bigbatch.tasks.sft.packing import pack_examples
from bigbatch.tasks.sft.padding import (
    PaddedLoader,
    TokenBudgetSampler,
    collate,
    pad_examples,
    padded_eval_batches,
)
from bigbatch.tools.verify import GradientRecorder, max_relative_error

SEQ_LEN, MICRO, PAD = 32, 4, 0


def numbered_examples(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples whose last input id is 1000 + their index (so a row names its example, even one
    cut from its start), lengths from 3 to 60 ids (some longer than a sequence), the loss on the
    second half."""
    rng = np.random.default_rng(seed)
    examples = []
    for i, n in enumerate(rng.integers(3, 61, size=count)):
        ids = rng.integers(1, 999, size=n)
        ids[-2] = 1000 + i
        examples.append((ids, np.arange(n) >= n // 2))
    return examples


def drawn(micro_batches) -> list[int]:
    """The examples in `micro_batches`, checking each row is one whole example right-padded
    (fillers hold none)."""
    found = []
    for mb in micro_batches:
        for inputs, targets in zip(mb.inputs.tolist(), mb.targets.tolist(), strict=True):
            n = sum(1 for x in inputs if x != PAD)
            if n == 0:
                assert all(t == IGNORE_INDEX for t in targets)  # a filler
                continue
            assert inputs[n:] == [PAD] * (len(inputs) - n)  # right padding only
            assert targets[n:] == [IGNORE_INDEX] * (len(inputs) - n)
            found.append(inputs[n - 1] - 1000)
    return found


def loaders(examples, world_size: int, global_tokens: int = 512, seed: int = 7):
    split = split_batch(global_tokens, SEQ_LEN, MICRO, world_size)
    return [PaddedLoader(examples, split, rank, seed) for rank in range(world_size)]


def test_a_step_holds_its_drawn_examples_once_within_the_budgets_and_ranks_share_it():
    examples = pad_examples(numbered_examples(300), SEQ_LEN, PAD)
    assert examples.truncated > 0  # the long ones are cut to a sequence
    [one] = loaders(examples, 1)
    two = loaders(examples, 2)
    replay = TokenBudgetSampler(examples.lengths, seed=7)
    for _ in range(12):  # past an epoch's end: 300 examples of ~24 tokens, 512 per step
        want = replay.next_step(512)
        one_step = one.next_step()
        found = drawn(one_step)
        assert sorted(found) == sorted(want.tolist())  # the drawn examples, each once
        assert 0 < one.last_step_tokens == int(examples.lengths[want].sum()) <= 512
        assert all(mb.inputs.numel() <= MICRO * SEQ_LEN for mb in one_step)
        shares = [loader.next_step() for loader in two]
        assert len(shares[0]) == len(shares[1]) == -(-len(one_step) // 2)
        for rank, share in enumerate(shares):  # rank r holds micro-batches r, r + 2, ...
            real = one_step[rank::2]
            assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
                       for a, b in zip(share, real, strict=False))
            assert all(int(filler.num_targets()) == 0 for filler in share[len(real):])
        assert [two[0].last_step_tokens, two[1].last_step_tokens] == [one.last_step_tokens] * 2


def test_a_step_stops_at_the_example_that_would_overflow_the_budget():
    examples = pad_examples(numbered_examples(300), SEQ_LEN, PAD)
    [loader] = loaders(examples, 1)
    order = loader.sampler._order.take(0, 300)
    found = drawn(loader.next_step())
    lengths = examples.lengths[order]
    want = int(np.searchsorted(np.cumsum(lengths), 512, side="right"))
    assert sorted(found) == sorted(order[:want].tolist())


def test_a_resumed_loader_draws_the_next_step_of_an_uninterrupted_one():
    examples = pad_examples(numbered_examples(300), SEQ_LEN, PAD)
    [straight] = loaders(examples, 1)
    [stopped] = loaders(examples, 1)
    for _ in range(10):  # into the second epoch
        straight.next_step()
        stopped.next_step()
    [resumed] = loaders(examples, 1)
    resumed.load_state_dict(stopped.state_dict())
    for _ in range(3):
        want, got = straight.next_step(), resumed.next_step()
        assert len(want) == len(got) and all(torch.equal(a.inputs, b.inputs)
                                             for a, b in zip(want, got, strict=True))
    packed = pack_examples(numbered_examples(300), SEQ_LEN, PAD, seed=7)
    rows = SFTLoader(packed, split_batch(512, SEQ_LEN, MICRO, 1), 0, 7)
    with pytest.raises(UsageError, match="data.packing=true"):
        resumed.load_state_dict(rows.state_dict())
    with pytest.raises(UsageError, match="data.packing=false"):
        rows.load_state_dict(resumed.state_dict())


def test_too_few_examples_for_one_step_is_a_usage_error():
    examples = pad_examples(numbered_examples(10), SEQ_LEN, PAD)
    with pytest.raises(UsageError, match="not more than one global batch"):
        loaders(examples, 1, global_tokens=4096)


# --- On a tiny GPT-2 --------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from sft_tiny import make_tiny, sst2_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-sft-pad"))


def sst2_examples(tokenizer, count: int):
    from bigbatch.tasks.sft.examples import Fields, tokenize_rows

    examples = tokenize_rows(sst2_rows(count), Fields(), tokenizer, shape="pair",
                             eot_id=tokenizer.eos_token_id)
    return [(e.ids, e.loss) for e in examples]


def gpt2(root, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.GPT2Config.from_pretrained(str(root))
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    return transformers.GPT2LMHeadModel(config).to(dtype).train()


@pytest.mark.usefixtures("single_thread")
def test_a_padded_example_gives_the_logits_it_gives_alone(tiny):
    root, tokenizer = tiny
    examples = pad_examples(sst2_examples(tokenizer, 12), 64, tokenizer.eos_token_id)
    assert len(set(examples.lengths.tolist())) > 3
    model = gpt2(root).eval()
    batch = collate(examples, np.arange(12))
    with torch.no_grad():
        together = model(**batch.model_inputs()).logits
        for row in range(12):
            n = int(examples.lengths[row])
            alone = model(input_ids=torch.from_numpy(examples.inputs[row])[None]).logits[0]
            torch.testing.assert_close(together[row, :n], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("single_thread")
def test_accumulation_over_uneven_padded_micro_batches_equals_one_big_batch(tiny):
    root, tokenizer = tiny
    examples = pad_examples(sst2_examples(tokenizer, 200), 48, tokenizer.eos_token_id)
    micro_batches = PaddedLoader(examples, split_batch(8 * 48, 48, 2, 1), 0, seed=3).next_step()
    counts = [int(mb.num_targets()) for mb in micro_batches]
    rows = [len(mb.inputs) for mb in micro_batches]
    assert len(micro_batches) >= 3 and max(counts) > min(counts)  # mean / k would be biased
    assert max(rows) > min(rows)  # as many examples as fit: more of the short ones
    model = gpt2(root, torch.float64)
    recorder = GradientRecorder(model.parameters())
    fp32 = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, recorder, micro_batches, loss_sum_fn=lm_loss_sum, precision=fp32)

    # The oracle: all the step's examples in one micro-batch, padded to the longest of them.
    whole = collate(examples, TokenBudgetSampler(examples.lengths, seed=3).next_step(8 * 48))
    assert int(whole.num_targets()) == sum(counts)
    model.zero_grad(set_to_none=True)
    reference_loss = lm_loss_sum(model, whole) / whole.num_targets()
    reference_loss.backward()
    reference = [p.grad.detach().clone() for p in model.parameters()]
    assert float(stats.loss) == pytest.approx(reference_loss.item(), rel=1e-12)
    assert max_relative_error(recorder.recorded, reference) <= 1e-10


@pytest.mark.usefixtures("single_thread")
def test_the_padded_validation_loss_is_the_packed_one(tiny):
    root, tokenizer = tiny
    pairs = sst2_examples(tokenizer, 60)
    model = gpt2(root)
    require_packed_sequences(model, "hf-config:tiny")  # packed rows: documents kept apart
    fp32 = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    cpu = torch.device("cpu")
    packed = evaluate(model, eval_batches(pack_examples(pairs, 64, tokenizer.eos_token_id, 0),
                                          4, 0, 1), fp32, DistInfo(), cpu)
    padded_batches = padded_eval_batches(pad_examples(pairs, 64, tokenizer.eos_token_id),
                                         4 * 64, 0, 1)
    padded = evaluate(model, padded_batches, fp32, DistInfo(), cpu)
    assert padded == pytest.approx(packed, rel=1e-6)


def test_bigbatch_config_says_the_padded_budgets_not_a_packed_micro_step_count():
    """`bigbatch config` with packing off: the step's token budget and the micro-batch's padded
    budget, not `num_micro_steps = ...` (the count follows the examples' lengths)."""
    from bigbatch.config.files import load_config
    from bigbatch.tasks.sft import SFT

    common = ["--train.task=sft", "--data.seq_len=128", "--batch.global_tokens=16384",
              "--batch.micro_batch_size=16"]
    packed = SFT.describe_batch(load_config(None, common), 2)
    padded = SFT.describe_batch(load_config(None, [*common, "--data.packing=false"]), 2)
    assert any(line.startswith("num_micro_steps = ") for line in packed)
    assert not any("num_micro_steps" in line for line in padded)
    assert padded[0].startswith("up to 16,384 tokens of whole examples per step, in "
                                "micro-batches of up to 16 x 128 = 2,048 padded tokens x 2")
    assert padded[1:] == packed[2:]  # the lr scaling and the schedule, as packed
