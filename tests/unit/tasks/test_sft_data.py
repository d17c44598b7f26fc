"""SFT data: prompt/response and chat rows -> ids with a response-only loss mask; packing into
rows with positions that restart per example (best-fit decreasing against a plain oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigbatch.batch import IGNORE_INDEX
from bigbatch.errors import UsageError
from bigbatch.tasks.sft.examples import Fields, read_rows, row_shape, tokenize_rows
from bigbatch.tasks.sft.packing import best_fit_decreasing, pack_examples

transformers = pytest.importorskip("transformers")
from conftest import SHARED  # noqa: E402

GPT2_BPE = SHARED / "models" / "gpt2-bpe"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    if not (GPT2_BPE / "vocab.json").is_file():
        pytest.fail(f"{GPT2_BPE} is missing: tests need ../shared beside the project")
    tok = transformers.AutoTokenizer.from_pretrained(str(GPT2_BPE))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_a_pair_row_has_the_loss_on_its_response_and_end_of_text_only(tokenizer):
    row = {"prompt": "Review: a gem of a film. Sentiment:", "response": " positive"}
    [example] = tokenize_rows([row], Fields(), tokenizer, shape="pair", eot_id=50256)
    prompt = tokenizer("Review: a gem of a film. Sentiment:")["input_ids"]
    response = tokenizer(" positive")["input_ids"]
    assert example.ids.tolist() == prompt + response + [50256]
    assert example.loss.tolist() == [False] * len(prompt) + [True] * (len(response) + 1)
    [with_prompt] = tokenize_rows([row], Fields(), tokenizer, shape="pair", eot_id=50256,
                                  loss_on_prompt=True)
    assert with_prompt.loss.all()


def test_batched_encoding_gives_the_ids_of_the_tokenizer_s_own_call(tokenizer):
    """Rows are encoded in batches through the fast tokenizer's backend: the ids the
    tokenizer's own `__call__` gives text by text, added special tokens and odd text included,
    for a transformers tokenizer and a plain `tokenizers.Tokenizer`."""
    from bigbatch.tasks.sft.examples import encode_batch

    texts = ["Review: a gem\nSentiment:", " positive", "<|im_start|>user\nhi<|im_end|>",
             "Ünïcödé\ttab  <|endoftext|>", " 日本語", ""]
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert encode_batch(tokenizer, texts) == expected
    assert encode_batch(tokenizer.backend_tokenizer, texts) == expected
    assert expected[2][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token


def test_a_chat_row_renders_what_the_template_renders_and_learns_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6, of course"}]
    [example] = tokenize_rows([{"messages": messages}], Fields(), tokenizer, shape="chat",
                              eot_id=0)
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert example.ids.tolist() == list(rendered["input_ids"])
    learned = tokenizer.decode(example.ids[example.loss])
    assert learned == "4<|im_end|>\n6, of course<|im_end|>\n"
    assert example.answer == "6, of course"


def test_packed_rows_hold_every_example_once_with_positions_restarting(tokenizer):
    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(3, 14, size=40):
        ids = rng.integers(0, 1000, size=n)
        loss = np.arange(n) >= n // 2
        examples.append((ids, loss))
    packed = pack_examples(examples, seq_len=16, pad_id=7, seed=1)
    assert packed.examples == 40 and packed.truncated == 0
    found = []
    for r in range(len(packed.inputs)):
        starts = np.flatnonzero(packed.position_ids[r] == 0).tolist() + [16]
        for a, b in zip(starts, starts[1:], strict=False):
            assert packed.position_ids[r, a:b].tolist() == list(range(b - a))
            found.append((packed.inputs[r, a:b].tolist(), packed.targets[r, a:b].tolist()))
    for ids, loss in examples:
        want_targets = [int(t) if keep else IGNORE_INDEX for t, keep in zip(ids[1:], loss[1:],
                                                                           strict=True)]
        assert found.count((ids[:-1].tolist(), want_targets)) >= 1
    pieces = sum(len(ids) - 1 for ids, _ in examples)
    assert packed.filled == pieces
    padding = [item for item in found if all(t == IGNORE_INDEX for t in item[1])
               and all(i == 7 for i in item[0])]
    assert len(found) - len(padding) == 40


def test_an_example_longer_than_a_row_is_cut_and_counted():
    ids = np.arange(30)
    packed = pack_examples([(ids, np.ones(30, dtype=bool))], seq_len=8, pad_id=0, seed=0)
    assert packed.truncated == 1 and packed.inputs.tolist() == [list(range(21, 29))]
    assert packed.targets.tolist() == [list(range(22, 30))]  # the end (the response) is kept


def naive_best_fit_decreasing(lengths: list[int], seq_len: int) -> list[int]:
    """The oracle: a scan of every row for the fullest one the example fits."""
    left: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, c in enumerate(left) if c >= n]
        if fits:
            best = min(fits, key=lambda i: left[i])
            left[best] -= n
        else:
            left.append(seq_len - n)
    return sorted(seq_len - c for c in left)


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_fills_rows_as_the_plain_scan_does(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=300).tolist()
    rows = best_fit_decreasing(lengths, 256, rng.permutation(300))
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == \
        naive_best_fit_decreasing(lengths, 256)


def test_a_perfect_packing_is_found():
    rows = best_fit_decreasing([6, 4, 5, 5, 3, 7], 10, np.arange(6))
    assert len(rows) == 3


def test_bad_rows_are_one_line_errors(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(UsageError, match="neither 'messages' nor both 'prompt' and 'response'"):
        row_shape(read_rows(path), Fields(), path)
    with pytest.raises(UsageError, match="empty 'response'"):
        tokenize_rows([{"prompt": "a", "response": "  "}], Fields(), tokenizer, shape="pair",
                      eot_id=0)
    with pytest.raises(UsageError, match="no field 'response'"):
        tokenize_rows([{"prompt": "a", "response": "b"}, {"prompt": "c"}], Fields(), tokenizer,
                      shape="pair", eot_id=0)
    plain = transformers.AutoTokenizer.from_pretrained(str(GPT2_BPE))
    with pytest.raises(UsageError, match="no chat template"):
        tokenize_rows([{"messages": [{"role": "assistant", "content": "hi"}]}], Fields(), plain,
                      shape="chat", eot_id=0)
    with pytest.raises(UsageError, match="no assistant message"):
        tokenize_rows([{"messages": [{"role": "user", "content": "hi"}]}], Fields(), tokenizer,
                      shape="chat", eot_id=0)
    path.write_text("{not json\n")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        read_rows(path)
