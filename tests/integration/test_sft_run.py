"""`bigbatch train --train.task=sft` end to end on a tiny GPT-2 (a 300-token BPE trained on
SST-2 in the fixture): the response loss falls on real data and exact match is scored; the saved
run loads with `from_pretrained`; a run stopped by a signal and resumed logs what an uninterrupted
run logs, bit for bit; bad data is a one-line error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from bigbatch.config.files import load_config
from bigbatch.run.train import train

transformers = pytest.importorskip("transformers")
from sft_tiny import make_tiny, sst2_rows  # noqa: E402
from small_runs import StopAfter, assert_ranks_agree, metric_rows, runs_on_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-sft"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-data")
    for name, rows in (("train", sst2_rows(3000)), ("val", sst2_rows(200, offset=3000))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args(model_dir, data, *extra: str) -> list[str]:
    return ["--train.task=sft", f"--model.source=hf-config:{model_dir / 'config.json'}",
            f"--data.tokenizer={model_dir}", f"--data.path={data / 'train.jsonl'}",
            f"--data.val_path={data / 'val.jsonl'}", "--data.seq_len=64",
            "--data.eval_generations=32", "--batch.global_tokens=2048",
            "--batch.micro_batch_size=8", "--batch.ramp=linear", "--optim.lr=3e-3",
            "--optim.warmup_steps=5", "--train.eval_tokens=4096", "--precision.dtype=fp32",
            "--train.device=cpu", "--checkpoint.every_minutes=0", *extra]


def test_the_response_loss_falls_and_exact_match_is_scored(tiny, data, tmp_path):
    model_dir, _ = tiny
    result = train(load_config(None, args(model_dir, data, "--train.max_steps=60",
                                          "--train.eval_every=30")), tmp_path / "run",
                   verbose=False)
    rows = [r for r in metric_rows(result.out_dir) if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 30, 60]  # before training, then every 30 steps
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0  # measured: 5.72 -> 0.55
    assert rows[0]["val_exact_match"] == 0.0
    # 60 steps of a 2-layer, 32-wide model: each answer is " positive" or " negative" and the
    # end of text, so a model that learned the format scores about the majority share or more
    # (measured: 0.66 over 32 held-out reviews); one that did not scores 0.
    assert rows[-1]["val_exact_match"] >= 0.4
    from bigbatch.tools.sample import sample_text

    said = sample_text(result.out_dir, "Review: a gem\nSentiment:", 2, 0.0, 0, 0)
    assert said.startswith("Review: a gem\nSentiment:") and len(said) > len("Review: a gem\n")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(result.out_dir))
    assert model.config.vocab_size == transformers.AutoTokenizer.from_pretrained(
        str(result.out_dir)).__len__()


@pytest.mark.parametrize("packing", ["true", "false"])
def test_stop_and_resume_equals_an_uninterrupted_run(tiny, data, tmp_path, packing):
    """Packed rows, and whole examples padded per micro-batch (data.packing = false): both
    train (the response loss falls) and resume bit for bit."""
    model_dir, _ = tiny
    common = args(model_dir, data, "--train.max_steps=6", "--train.eval_every=3",
                  "--checkpoint.every_steps=2",  # GPT-2's own dropout on: RNG restored
                  f"--data.packing={packing}")
    straight = train(load_config(None, common), tmp_path / "straight", verbose=False)
    losses = [r["val_loss"] for r in metric_rows(straight.out_dir) if "val_loss" in r]
    assert losses[-1] < losses[0] - 0.4  # measured: 5.72 -> 5.09 packed, 5.07 padded
    first = train(load_config(None, common), tmp_path / "resumed", verbose=False,
                  preemption=StopAfter(3))
    assert (first.state.step, first.exit_code) == (3, 128 + signal.SIGTERM)
    train(load_config(None, common), tmp_path / "resumed", verbose=False, resume="auto")
    assert metric_rows(tmp_path / "resumed") == metric_rows(straight.out_dir)


@pytest.mark.parametrize("packing", ["true", "false"])
def test_two_ranks_equal_one_process(tiny, data, tmp_path, packing):
    """`--nproc 2` (gloo, DDP): every step's loss, the evaluations and the final weights equal
    one process's, to fp32 rounding (the ranks sum their gradients in another order); packed
    rows, and padded micro-batches dealt to the ranks in turn (a short rank runs fillers). Dropout
    off (each rank draws its own masks) and AdamW (Muon's bf16 Newton-Schulz on this CPU would
    widen that rounding to bf16's)."""
    model_dir, _ = tiny
    quiet = tmp_path / "nodrop"
    config = transformers.GPT2Config.from_pretrained(str(model_dir))
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    config.save_pretrained(str(quiet))
    runs = runs_on_ranks(args(model_dir, data, f"--model.source=hf-config:{quiet / 'config.json'}",
                              "--train.max_steps=3", "--train.eval_every=3",
                              "--optim.name=adamw", "--data.eval_generations=0",
                              f"--data.packing={packing}"), tmp_path)
    assert_ranks_agree(runs, steps=3)
    assert len(runs[1][1]) == 2  # before training and at the end


def test_chat_rows_train_through_the_tokenizer_s_template(tiny, data, tmp_path):
    """Messages rows and a tokenizer with a chat template: the run renders, trains and scores
    the assistant's answers (a prompt/response run's machinery, reached through the template)."""
    model_dir, tokenizer = tiny
    chat_dir = tmp_path / "chat-tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{{ eos_token if m['role'] == 'assistant' else '\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(str(chat_dir))
    chats = [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["response"].strip()}]}
             for r in sst2_rows(600)]
    rows = tmp_path / "chats.jsonl"
    rows.write_text("".join(json.dumps(c) + "\n" for c in chats))
    result = train(load_config(None, [
        *args(model_dir, data, f"--data.path={rows}", "--data.val_path=",
              f"--data.tokenizer={chat_dir}", "--train.max_steps=4", "--train.eval_every=4",
              "--data.val_fraction=0.1")]), tmp_path / "run", verbose=False)
    evaluations = [r for r in metric_rows(result.out_dir) if "val_loss" in r]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]
    assert "val_exact_match" in evaluations[-1]


@pytest.mark.parametrize("rows, message", [
    ([{"question": "a", "answer": "b"}], "has neither 'messages' nor both 'prompt' and"),
    ([{"prompt": "a", "response": " "}], "has an empty 'response'"),
])
def test_bad_data_is_a_one_line_error(tiny, data, tmp_path, rows, message):
    model_dir, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "-m", "bigbatch", "train",
                           *args(model_dir, data, f"--data.path={bad}", "--train.max_steps=1"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
