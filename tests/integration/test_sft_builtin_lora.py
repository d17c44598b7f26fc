"""The issue's other model path: a built-in GPT trained by `bigbatch train`, exported with
`bigbatch export --format hf`, then fine-tuned by SFT with LoRA adapters. The response loss falls,
and the merged export of the result differs from the exported GPT only by low-rank updates of the
adapted projections (LoRA trained the adapters and nothing else)."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.files import load_config
from bigbatch.run.train import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from sft_tiny import sst2_rows  # noqa: E402
from small_runs import metric_rows, small_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
RANK = 4


def test_an_exported_builtin_gpt_fine_tunes_with_lora(tiny_overrides, tmp_path):
    pretrained = train(small_config(tiny_overrides, "--data.vocab_size=512",
                                    "--train.max_steps=30", "--train.eval_every=30",
                                    "--model.dropout=0"), tmp_path / "lm", verbose=False)
    base_dir = tmp_path / "gpt2"
    assert main(["export", str(pretrained.out_dir), "--format", "hf", "--out", str(base_dir)]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(1000)))
    result = train(load_config(None, [
        "--train.task=sft", f"--model.source=hf:{base_dir}", f"--data.tokenizer={base_dir}",
        f"--data.path={rows}", "--data.val_fraction=0.1", "--data.seq_len=64",
        "--data.eval_generations=0", "--model.adapter=lora", f"--model.lora_rank={RANK}",
        "--model.lora_dropout=0", "--batch.global_tokens=1024", "--batch.micro_batch_size=4",
        "--batch.ramp=linear", "--optim.name=adamw", "--optim.decay=cosine", "--optim.lr=3e-2",
        "--optim.warmup_steps=2", "--train.max_steps=20", "--train.eval_every=5",
        "--train.eval_tokens=2048", "--precision.dtype=fp32", "--train.device=cpu",
        "--checkpoint.every_minutes=0"]), tmp_path / "sft", verbose=False)
    evaluations = [r["val_loss"] for r in metric_rows(result.out_dir) if "val_loss" in r]
    # Measured 5.88 -> 5.44 held-out response loss. LoRA leaves the tied embeddings frozen, and
    # a 30-step GPT's are still near their 0.02 initial scale, which bounds how far the logits
    # can move: the fall is real but small (a frozen model would not move at all).
    assert evaluations[-1] < evaluations[0] - 0.3, evaluations

    merged_dir = tmp_path / "merged"
    assert main(["export", str(result.out_dir), "--format", "hf", "--merge", "--out",
                 str(merged_dir)]) == 0
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).state_dict()
    merged = transformers.GPT2LMHeadModel.from_pretrained(merged_dir).state_dict()
    assert base.keys() == merged.keys()
    adapted = {name for name in base if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight",
                                                       "mlp.c_fc.weight", "mlp.c_proj.weight"))}
    assert len(adapted) == 4  # one block (small_runs.SMALL) x GPT-2's 4 LoRA default targets
    for name, weight in base.items():
        delta = merged[name] - weight
        if name in adapted:  # B @ A: rank at most lora_rank, and not zero (it was trained)
            assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= RANK, name
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name
