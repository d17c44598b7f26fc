"""The SFT task on a tiny GPT-2 (a 300-token BPE trained on SST-2 here, no downloads):
the loss counts response tokens only (a prompt position's logits get no gradient), accumulation
over micro-batches with very different response counts equals one big batch, two ranks share a
step's rows exactly, and packed examples do not see each other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigbatch.batch import IGNORE_INDEX, split_batch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, token_loss_sum, train_step
from bigbatch.tasks.sft.examples import Fields, tokenize_rows
from bigbatch.tasks.sft.loader import SFTLoader
from bigbatch.tasks.sft.packing import pack_examples
from bigbatch.tools.verify import GradientRecorder, max_relative_error

transformers = pytest.importorskip("transformers")
from sft_tiny import make_tiny, sst2_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-sft"))


def gpt2(root):
    from bigbatch.model.hf_lm import require_packed_sequences

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(str(root)))
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(model.config).double()
    require_packed_sequences(model, "hf-config:tiny")
    return model.train()


def packed(tokenizer, count: int, seq_len: int = 64, seed: int = 0):
    examples = tokenize_rows(sst2_rows(count), Fields(), tokenizer, shape="pair",
                             eot_id=tokenizer.eos_token_id)
    return examples, pack_examples([(e.ids, e.loss) for e in examples], seq_len,
                                   tokenizer.eos_token_id, seed)


def test_only_response_tokens_count_and_a_prompt_position_gets_no_gradient(tiny):
    root, tokenizer = tiny
    examples, rows = packed(tokenizer, 40)
    assert rows.truncated > 0  # some reviews are longer than a row: their responses still count
    model = gpt2(root)
    batch = SFTLoader(rows, split_batch(len(rows.inputs) * 64, 64, len(rows.inputs), 1),
                      rank=0, seed=0).next_step()[0]
    responses = sum(int(e.loss.sum()) for e in examples)  # " positive"/" negative" + end of text
    assert int(batch.num_targets()) == responses
    logits = model(**batch.model_inputs()).logits
    logits.retain_grad()
    token_loss_sum(logits, batch.targets).backward()
    prompt = batch.targets == IGNORE_INDEX
    assert prompt.any() and float(logits.grad[prompt].abs().max()) == 0.0
    assert bool((logits.grad[~prompt].abs().amax(-1) > 0).all())


def test_accumulation_over_uneven_micro_batches_equals_one_big_batch(tiny):
    root, tokenizer = tiny
    _, rows = packed(tokenizer, 120, seq_len=48)
    global_rows = 8
    loader = SFTLoader(rows, split_batch(global_rows * 48, 48, 2, 1), rank=0, seed=3)
    micro_batches = loader.next_step()
    counts = [int(mb.num_targets()) for mb in micro_batches]
    assert len(micro_batches) == 4 and max(counts) > min(counts)  # mean / k would be biased
    model = gpt2(root)
    recorder = GradientRecorder(model.parameters())
    fp32 = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, recorder, micro_batches, loss_sum_fn=lm_loss_sum, precision=fp32)
    accumulated = recorder.recorded

    whole = SFTLoader(rows, split_batch(global_rows * 48, 48, global_rows, 1), rank=0,
                      seed=3).next_step()
    assert len(whole) == 1 and int(whole[0].num_targets()) == sum(counts)
    model.zero_grad(set_to_none=True)
    reference_loss = lm_loss_sum(model, whole[0]) / whole[0].num_targets()
    reference_loss.backward()
    reference = [p.grad.detach().clone() for p in model.parameters()]
    assert float(stats.loss) == pytest.approx(float(reference_loss), rel=1e-12)
    assert max_relative_error(accumulated, reference) <= 1e-10


def test_two_ranks_hold_the_one_rank_step_exactly(tiny):
    _, tokenizer = tiny
    _, rows = packed(tokenizer, 120, seq_len=48)
    one = SFTLoader(rows, split_batch(8 * 48, 48, 2, 1), rank=0, seed=5).next_step()
    two = [SFTLoader(rows, split_batch(8 * 48, 48, 2, 2), rank=r, seed=5).next_step()
           for r in range(2)]
    stack = lambda mbs: torch.cat([mb.inputs for mb in mbs])  # noqa: E731
    assert torch.equal(stack(one), torch.cat([stack(two[0]), stack(two[1])]))
    positions = torch.cat([mb.position_ids for mbs in two for mb in mbs])
    assert torch.equal(positions, torch.cat([mb.position_ids for mb in one]))


def test_each_packed_example_gives_the_logits_it_gives_alone(tiny):
    root, tokenizer = tiny
    examples, rows = packed(tokenizer, 30)
    model = gpt2(root).eval()
    row = next(r for r in range(len(rows.inputs))  # a row holding two examples or more
               if (rows.position_ids[r] == 0).sum() >= 3)
    starts = np.flatnonzero(rows.position_ids[row] == 0).tolist() + [rows.inputs.shape[1]]
    together = model(input_ids=torch.from_numpy(rows.inputs[row:row + 1]),
                     position_ids=torch.from_numpy(rows.position_ids[row:row + 1])).logits[0]
    checked = 0
    for a, b in zip(starts, starts[1:], strict=False):
        if (rows.targets[row, a:b] == IGNORE_INDEX).all():
            continue  # padding
        alone = model(input_ids=torch.from_numpy(rows.inputs[row:row + 1, a:b])).logits[0]
        torch.testing.assert_close(together[a:b], alone, rtol=1e-9, atol=1e-9)
        checked += 1
    assert checked >= 2


def test_the_data_file_round_trip_and_exact_match_of_a_known_answer(tiny, tmp_path):
    """`bigbatch train --train.task=sft` from a JSONL file: rows are read, tokenized, packed;
    the exact-match scorer scores an answer the model is forced to give as right."""
    from bigbatch.parallel.process_group import DistInfo
    from bigbatch.tasks.sft.evaluation import exact_match
    from bigbatch.tasks.sft.examples import read_rows

    _, tokenizer = tiny
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(20)))
    examples = tokenize_rows(read_rows(path), Fields(), tokenizer, shape="pair",
                             eot_id=tokenizer.eos_token_id)
    answer = tokenizer(examples[0].answer, add_special_tokens=False)["input_ids"]

    class Parrot(torch.nn.Module):  # says the first example's answer to any prompt, then stops
        start: int | None = None

        def forward(self, input_ids):
            self.start = self.start or input_ids.shape[1]
            done = input_ids.shape[1] - self.start
            token = ([*answer, tokenizer.eos_token_id] + [0] * 8)[done]
            logits = torch.zeros(1, input_ids.shape[1], len(tokenizer))
            logits[0, -1, token] = 1.0
            return logits

    fp32 = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    score = exact_match(Parrot(), examples[:1], tokenizer.decode, tokenizer.eos_token_id,
                        len(answer) + 3, 1024, fp32, DistInfo(), torch.device("cpu"))
    assert score == 1.0
    other = [e for e in examples if e.answer != examples[0].answer]
    assert other  # the rows hold both answers: the scorer must also say "wrong"
    assert exact_match(Parrot(), other[:1], tokenizer.decode, tokenizer.eos_token_id,
                           len(answer) + 3, 1024, fp32, DistInfo(), torch.device("cpu")) == 0.0
