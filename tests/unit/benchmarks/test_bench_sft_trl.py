"""The shared yardsticks of benchmarks/bench_sft_trl.py, which score both tools' models and
gradients (no TRL needed): the validation loss is the exact mean over response tokens, computed
by hand here example by example; exact match counts a right greedy answer and not a wrong one;
the reference gradient is that loss's gradient."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

transformers = pytest.importorskip("transformers")
from sft_tiny import sst2_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
LONGER = " a much longer answer than one word"


def load_shared():
    spec = importlib.util.spec_from_file_location(
        "sft_trl_shared", ROOT / "benchmarks" / "sft_trl_shared.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sft_trl_shared", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    """A word-level tokenizer of the test's rows (built in milliseconds, unlike a BPE) with an
    end-of-text token, and a 1-layer, 32-wide GPT-2 at a fixed seed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([r["prompt"] + r["response"] for r in sst2_rows(20)] + [LONGER],
                              trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eot>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eot>",
                                                     unk_token="[UNK]")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
        eos_token_id=tokenizer.eos_token_id)).eval()
    return model, tokenizer


def by_hand(model, tokenizer, rows) -> float:
    """Each example alone, unpadded: -log p(token) summed over the response's tokens and the
    end of text, over all examples, divided by their number."""
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids = prompt + response + [tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(len(prompt), len(ids)):
            total -= float(log_probs[t - 1, ids[t]])
            count += 1
    return total / count


def test_validation_loss_is_the_exact_mean_over_response_tokens(tiny):
    """Rows of different lengths in padded batches of 3 (the last one short) give the mean over
    all response tokens, not a mean of batch means."""
    model, tokenizer = tiny
    shared = load_shared()
    rows = sst2_rows(7)
    rows[2] = {**rows[2], "response": LONGER}
    expected = by_hand(model, tokenizer, rows)
    assert shared.validation_loss(model, tokenizer, rows, batch_size=3) == pytest.approx(
        expected, rel=1e-5)
    means = [by_hand(model, tokenizer, rows[i:i + 3]) for i in range(0, 7, 3)]
    assert abs(sum(means) / len(means) - expected) > 1e-3  # the test tells the two apart


class Scripted(torch.nn.Module):
    """A 'causal LM' whose next token is fixed by the last one: `after[last]`."""

    def __init__(self, vocab: int, after: dict[int, int]) -> None:
        super().__init__()
        self.vocab, self.after = vocab, after
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, last in enumerate(input_ids[0].tolist()):
            logits[0, i, self.after.get(last, 0)] = 1.0
        return transformers.modeling_outputs.CausalLMOutput(logits=logits)


def test_exact_match_counts_right_answers_only(tiny):
    _, tokenizer = tiny
    shared = load_shared()
    right, wrong = sst2_rows(2)
    wrong = {**wrong, "response": " positive" if wrong["response"] == " negative" else " negative"}
    prompt_end = tokenizer(right["prompt"], add_special_tokens=False)["input_ids"][-1]
    answer = tokenizer(right["response"], add_special_tokens=False)["input_ids"]
    chain = [prompt_end, *answer, tokenizer.eos_token_id]
    model = Scripted(len(tokenizer), dict(zip(chain, chain[1:], strict=False)))
    # Both prompts end alike, so the model says the first row's answer to both.
    assert shared.exact_match(model, tokenizer, [right], max_new_tokens=len(answer) + 1) == 1.0
    assert shared.exact_match(model, tokenizer, [right, wrong],
                              max_new_tokens=len(answer) + 1) == 0.5


def test_reference_gradient_weighs_each_example_by_its_response_tokens(tiny):
    """The gradient of the exact mean over two halves is the halves' gradients weighted by
    their response-token counts (n1 g1 + n2 g2) / (n1 + n2), not their plain mean; and the
    error measure is 0 on equal gradients, infinite on a missing one."""
    model, tokenizer = tiny
    shared = load_shared()
    rows = sst2_rows(4)
    rows[3] = {**rows[3], "response": LONGER}
    whole = shared.reference_gradients(model, tokenizer, rows)
    halves = [shared.reference_gradients(model, tokenizer, rows[:2]),
              shared.reference_gradients(model, tokenizer, rows[2:])]
    counts = [int((shared.padded_batch(tokenizer, half)[2] != -100).sum())
              for half in (rows[:2], rows[2:])]
    weighted = {name: (counts[0] * halves[0][name] + counts[1] * halves[1][name]) / sum(counts)
                for name in whole}
    plain = {name: (halves[0][name] + halves[1][name]) / 2 for name in whole}
    assert shared.max_relative_error(weighted, whole) < 1e-5
    assert shared.max_relative_error(plain, whole) > 1e-2
    assert shared.max_relative_error(whole, whole) == 0.0
    assert shared.max_relative_error({}, whole) == float("inf")
