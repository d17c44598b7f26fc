"""The accumulation check of benchmarks/bench_sft_trl.py: the gradient each tool hands its
optimizer after k micro-batches, against one forward/backward over all the examples at once with
the exact mean over their response tokens (sft_trl_shared.reference_gradients), in fp32 with
dropout off.

The examples are `review_rows` (write a review of a given sentiment: responses of 1 to ~60
tokens), ordered by response length, so with k = 8 the first micro-batch holds the shortest
responses and the last the longest: micro-batches with very different response-token counts.
Micro-batch j is examples j*m .. j*m+m-1 on both sides, and both sides see each micro-batch as
one row of its examples side by side with positions restarting at each (bigbatch: its own
best-fit packing of those examples into one row; TRL: `padding_free=True`, no packing, a
sequential sampler), from the same ids (TRL gets them pre-tokenized).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import sft_trl_shared as shared


def grouped(rows: list, k: int) -> list[list]:
    size = len(rows) // k
    return [rows[j * size:(j + 1) * size] for j in range(k)]


def bigbatch_gradients(model, tokenizer, rows: list, k: int) -> tuple[dict, float, list[int]]:
    """(named gradients train_step hands its optimizer, verify()'s own error, response tokens
    per micro-batch)."""
    from bigbatch.model.hf_lm import require_packed_sequences
    from bigbatch.tasks.sft.examples import Fields, tokenize_rows
    from bigbatch.tasks.sft.loader import rows_batch
    from bigbatch.tasks.sft.packing import pack_examples
    from bigbatch.tools.verify import accumulated_gradients, verify

    groups = [tokenize_rows(group, Fields(), tokenizer, shape="pair",
                            eot_id=tokenizer.eos_token_id) for group in grouped(rows, k)]
    # One row holds each micro-batch's examples; rows of one width (the tail padding, a document
    # of its own with no targets), so verify() can also stack them into one batch.
    width = max(sum(len(e.ids) - 1 for e in examples) for examples in groups)
    micro_batches = []
    for examples in groups:
        packed = pack_examples([(e.ids, e.loss) for e in examples], width,
                               tokenizer.eos_token_id, seed=0)
        assert len(packed.inputs) == 1
        micro_batches.append(rows_batch(packed, [0]))
    # What train.task = "sft" does to the model before training: no generation cache, so
    # transformers keeps the packed examples apart by their restarting positions (checked).
    require_packed_sequences(model, "hf:benchmark")
    recorded = accumulated_gradients(model, micro_batches)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    own = verify(model, micro_batches).max_relative_error if k > 1 else 0.0
    return (dict(zip(names, recorded, strict=True)), own,
            [int(mb.num_targets()) for mb in micro_batches])


def trl_gradients(model_dir: str, tokenizer, rows: list, k: int, spec: dict,
                  padding_free: bool = True) -> dict:
    """The gradients SFTTrainer has accumulated when it reaches its first optimizer step."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from sft_trl_arms import trl_config

    captured: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.update({name: p.grad.detach().float().cpu().clone()
                             for name, p in model.named_parameters() if p.grad is not None})

    items = []
    for row in rows:
        prompt, response = shared.encode(tokenizer, row)
        items.append({"input_ids": prompt + response,
                      "completion_mask": [0] * len(prompt) + [1] * len(response)})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="trl-grad-") as out:
        config = trl_config({**spec, "steps": 1, "device": "cpu"}, Path(out),
                            per_device_train_batch_size=len(rows) // k,
                            gradient_accumulation_steps=k, max_grad_norm=0.0, learning_rate=0.0,
                            warmup_steps=0, packing=False, padding_free=padding_free,
                            max_length=None, train_sampling_strategy="sequential",
                            logging_steps=1)
        trainer = SFTTrainer(model=model, args=config,
                             train_dataset=datasets.Dataset.from_list(items),
                             processing_class=tokenizer, callbacks=[Capture()])
        trainer.train()
    return captured


def gradients(spec: dict) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = shared.review_rows(Path(spec["sst2_train"]), 200, offset=spec["grad_offset"])
    length = {id(r): len(shared.encode(tokenizer, r)[1]) for r in rows}
    # 32 examples spread over the lengths, shortest response first
    ordered = sorted(rows, key=lambda r: length[id(r)])
    rows = [ordered[round(i * (len(ordered) - 1) / 31)] for i in range(32)]
    # GPT-2's dropout off in the model itself: the Trainer puts the model in train mode
    config = transformers.AutoConfig.from_pretrained(spec["model_dir"])
    config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    quiet_dir = Path(spec["scratch"]) / "no-dropout"
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], config=config,
                                                 dtype=torch.float32)
    model.save_pretrained(quiet_dir)
    tokenizer.save_pretrained(quiet_dir)
    reference = shared.reference_gradients(model, tokenizer, rows)
    results = []
    for k in (1, 8):
        mine, own, counts = bigbatch_gradients(model, tokenizer, rows, k)
        results.append({"tool": "bigbatch", "k": k, "error": shared.max_relative_error(mine,
                                                                                        reference),
                        "verify": own, "counts": counts})
        for padding_free in (True, False):
            theirs = trl_gradients(str(quiet_dir), tokenizer, rows, k, spec, padding_free)
            results.append({"tool": "trl", "padding_free": padding_free, "k": k,
                            "error": shared.max_relative_error(theirs, reference)})
    # What `mean / k` (each micro-batch's mean, averaged) would give: the size of the effect
    # an inexact accumulation shows on these micro-batches.
    naive = {name: torch.zeros_like(g) for name, g in reference.items()}
    for group in grouped(rows, 8):
        for name, g in shared.reference_gradients(model, tokenizer, group).items():
            naive[name] += g / 8
    return {"results": results, "examples": len(rows),
            "mean_over_k_error": shared.max_relative_error(naive, reference)}
