"""The baseline: a minimal training loop written plainly, as an engineer would without bigbatch.

Same model (`bigbatch.model.GPT` with its default SDPA attention, as nanoGPT writes it: the
parameters and the function are identical; bigbatch's own CPU choice, the explicit attention
kernel, is one of the levers it is measured by), same batch
(global tokens reached by accumulating `loss / k` over k micro-batches), same precision
(`torch.autocast` bf16, or fp32), clipping at 1.0 like the default recipe, and the optimizer as
one writes it: `torch.optim.AdamW(model.parameters(), lr)` (defaults: no fusion, no parameter
groups). Data: bigbatch's prepared token array of the default corpus (the standard-library
sources, cached by `prepare_corpus`), sampled nanoGPT style at random offsets; `--data random`
draws uniform random tokens of the vocabulary instead (no corpus needed).

Prints one JSON line: tokens/s over the timed steps (after `--warmup-steps` untimed ones).

    python benchmarks/plain_loop.py --dtype bf16 --global-tokens 16384 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from bigbatch.config.sections import DataConfig
from bigbatch.model.gpt import GPT, GPTShape


def token_source(kind: str, vocab_size: int) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(0).integers(0, vocab_size, size=1 << 20, dtype=np.int64)
    from bigbatch.data.corpus import prepare_corpus

    corpus = prepare_corpus(DataConfig(vocab_size=vocab_size))
    return corpus.train_tokens


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
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--data", choices=("corpus", "random"), default="corpus")
    args = parser.parse_args(argv)

    torch.manual_seed(1337)
    data = token_source(args.data, args.vocab)
    model = GPT(GPTShape(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.layers,
                         n_head=args.heads, d_model=args.d_model)).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    accum_steps = args.global_tokens // (args.micro_batch * args.seq_len)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.random.randint(0, len(data) - args.seq_len - 1, size=args.micro_batch)
        rows = np.stack([data[s:s + args.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].to(args.device), rows[:, 1:].to(args.device)

    timed_seconds, losses = 0.0, []
    for step in range(args.warmup_steps + args.steps):
        started = time.perf_counter()
        for _ in range(accum_steps):
            x, y = get_batch()
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            (loss / accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= args.warmup_steps:
            timed_seconds += time.perf_counter() - started

    tokens = args.steps * accum_steps * args.micro_batch * args.seq_len
    result = {"tokens_per_s": tokens / timed_seconds, "timed_steps": args.steps,
              "accum_steps": accum_steps, "dtype": args.dtype, "data": args.data,
              "threads": torch.get_num_threads(), "last_loss": losses[-1]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
