"""A Hugging Face causal LM (a tiny GPT-2 from a config) trained with `train.task = "lm"`:
it learns, resumes exactly from a checkpoint (its tied output matrix included), and its run
directory loads in `transformers`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from bigbatch.run.train import train  # noqa: E402
from conftest import SHARED  # noqa: E402
from small_runs import StopAfter, metric_rows, small_config  # noqa: E402

GPT2_BPE = SHARED / "models" / "gpt2-bpe"


@pytest.fixture(scope="module")
def tiny_gpt2_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.1, embd_pdrop=0.1,
                            attn_pdrop=0.0).save_pretrained(root)
    return root / "config.json"


def test_hf_causal_lm_trains_and_resumes_exactly(tmp_path, tiny_overrides, tiny_gpt2_config):
    """Loss falls; 3 steps + stop + resume equal 6 straight steps, metric for metric and in the
    saved weights; the run directory is a Hugging Face model directory."""
    hf = [f"--model.source=hf-config:{tiny_gpt2_config}", f"--data.tokenizer={GPT2_BPE}",
          "--optim.lr=3e-3", "--model.activation_checkpointing=every_n",
          "--model.checkpoint_every=2"]
    straight = train(small_config(tiny_overrides, *hf), tmp_path / "straight", verbose=False)
    rows = metric_rows(straight.out_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.2
    cfg = small_config(tiny_overrides, *hf, "--checkpoint.every_steps=2")
    first = train(cfg, tmp_path / "resumed", verbose=False, preemption=StopAfter(3))
    assert (first.state.step, first.exit_code) == (3, 128 + signal.SIGTERM)
    second = train(cfg, tmp_path / "resumed", verbose=False, resume="auto")
    assert second.state.step == 6
    assert metric_rows(tmp_path / "resumed") == rows
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    again = transformers.AutoModelForCausalLM.from_pretrained(straight.out_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert a.equal(b), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
