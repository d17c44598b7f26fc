"""The second baseline: the Hugging Face `Trainer` training an equivalent `GPT2LMHeadModel`.

Equivalent model: GPT-2 blocks are bigbatch's (pre-LayerNorm, tanh-GELU MLP of 4x width, learned
positions, tied embeddings, biases in every Linear and LayerNorm), sized like bigbatch's, with
SDPA attention and dropout off. Same tokens: bigbatch's prepared token array of the default corpus
(the standard-library sources, cached by `prepare_corpus`) cut into `seq_len + 1` windows; same
global batch (`--global-tokens`), reached through `gradient_accumulation_steps`; same precision
(`bf16=True` is autocast, as in bigbatch), clipping at 1.0, AdamW with lr 1e-3. The Trainer is
used as its documentation shows, with logging, saving and evaluation off so they cost nothing.

Prints one JSON line: tokens/s over the timed steps (after `--warmup-steps` untimed ones),
timed by a callback from the start to the end of each optimizer step.

    python benchmarks/hf_trainer_loop.py --dtype bf16 --global-tokens 16384 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


class Windows(torch.utils.data.Dataset):
    """Random `seq_len + 1` windows of the token array, as `input_ids` and `labels` (the model
    shifts labels itself)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int) -> None:
        starts = np.random.default_rng(0).integers(0, len(tokens) - seq_len - 1, size=count)
        self.rows = [torch.from_numpy(np.asarray(tokens[s:s + seq_len], dtype=np.int64))
                     for s in starts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/bench_gpu.py)")
    parser.add_argument("--global-tokens", type=int, default=16384)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    args = parser.parse_args(argv)

    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from bigbatch.config.sections import DataConfig
    from bigbatch.data.corpus import prepare_corpus

    tokens = prepare_corpus(DataConfig(vocab_size=args.vocab)).train_tokens
    accum_steps = args.global_tokens // (args.micro_batch * args.seq_len)
    total_steps = args.warmup_steps + args.steps
    dataset = Windows(tokens, args.seq_len, total_steps * accum_steps * args.micro_batch)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model,
                        n_layer=args.layers, n_head=args.heads, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(1337)
    model = GPT2LMHeadModel(config)

    step_started: list[float] = []
    step_seconds: list[float] = []

    def sync() -> None:
        if args.device != "cpu":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            sync()
            step_started.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kwargs):
            sync()  # a GPU step is timed to its end, not to its last kernel launch
            step_seconds.append(time.perf_counter() - step_started[-1])

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=accum_steps, max_steps=total_steps,
            learning_rate=1e-3, max_grad_norm=1.0, bf16=args.dtype == "bf16",
            use_cpu=args.device == "cpu",
            lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to="none", dataloader_num_workers=0,
            disable_tqdm=True, seed=1337)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          callbacks=[StepTimer()])
        trainer.train()

    timed = step_seconds[args.warmup_steps:]
    tokens_per_step = accum_steps * args.micro_batch * args.seq_len
    result = {"tokens_per_s": len(timed) * tokens_per_step / sum(timed),
              "timed_steps": len(timed), "accum_steps": accum_steps, "dtype": args.dtype,
              "optim": training_args.optim.value if hasattr(training_args.optim, "value")
              else str(training_args.optim),
              "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
