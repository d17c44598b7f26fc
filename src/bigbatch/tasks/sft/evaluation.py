"""SFT evaluation beside the response loss: exact-match accuracy of greedy generations.

Each held-out example with a reference answer is its prompt (the ids before its first loss
token) continued greedily for `max_new_tokens` tokens; the generation, cut at the end-of-text
token and stripped, must equal the reference answer stripped. The examples are dealt to the
ranks; every rank runs the same number of forwards (examples padded with a repeat, no early
stop), because under FSDP every forward is a collective.

A plain loop without a KV cache, not `generate()`: answers here are a few tokens, the loop is the
same for the built-in GPT and any Hugging Face causal LM, and it costs prompt x new tokens,
which at these lengths is less than `generate()`'s set-up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bigbatch.engine.precision import Precision
from bigbatch.parallel.process_group import DistInfo, all_reduce_sum
from bigbatch.tasks.sft.examples import Example


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def exact_match(model: nn.Module, examples: list[Example], decode: Callable[[list[int]], str],
                eot_id: int, max_new_tokens: int, context: int, precision: Precision,
                dist: DistInfo, device: torch.device) -> float:
    """The share of `examples` whose greedy continuation is their answer, over all ranks (the
    model sees at most the last `context` tokens: its sequence length)."""
    scored = [e for e in examples if e.answer is not None]
    mine = scored[dist.rank::dist.world_size]
    per_rank = -(-len(scored) // dist.world_size)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # [right, counted]
    model.eval()
    with precision.autocast():
        for i in range(per_rank):
            padding = i >= len(mine)  # a repeat, not counted: keeps the forwards in step
            example = mine[i] if not padding else (mine or scored)[0]
            ids = torch.as_tensor(example.ids[:example.prompt_length], device=device)[None]
            generated: list[int] = []
            for _ in range(max_new_tokens):
                logits = logits_of(model(input_ids=ids[:, -context:]))
                token = int(logits[0, -1].argmax())
                generated.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            if not padding:
                cut = generated.index(eot_id) if eot_id in generated else len(generated)
                hits[0] += decode(generated[:cut]).strip() == example.answer.strip()
                hits[1] += 1
    model.train()
    all_reduce_sum(hits, dist)
    return float(hits[0] / hits[1].clamp(min=1))
