"""What both arms of benchmarks/bench_sft_trl.py are scored and checked by, one function each,
so that neither tool's own evaluation decides: the SST-2 rows, how an example becomes token ids,
the validation loss on responses, exact match of greedy answers, and the one-big-batch reference
gradient. Needs torch and a Hugging Face causal LM and tokenizer; not TRL.

An example is the prompt's ids, then the response's ids, then the end-of-text id (tokenized
apart, so the response's tokens are exactly known); the loss is on the response and the end of
text: the next-token cross-entropy at every position whose target is one of those.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

LABELS = {"0": " negative", "1": " positive"}


def sst2_rows(tsv: Path, count: int, offset: int = 0) -> list[dict[str, str]]:
    """SST-2 as configs/sft-sst2.toml reads it (benchmarks/make_sft_data.py): a review, then the
    one-word sentiment to answer."""
    with tsv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[offset:offset + count]
    return [{"prompt": f"Review: {r['sentence'].strip()}\nSentiment:", "response": LABELS[r["label"]]}
            for r in rows]


def review_rows(tsv: Path, count: int, offset: int = 0) -> list[dict[str, str]]:
    """The same reviews the other way round: write a review of a given sentiment. Responses are
    whole reviews (1 to ~60 tokens), so micro-batches hold very different numbers of response
    tokens: the case where the mean of micro-batch means is not the mean."""
    return [{"prompt": f"Sentiment:{r['response']}\nReview:",
             "response": " " + r["prompt"].removeprefix("Review: ").rsplit("\nSentiment:", 1)[0]}
            for r in sst2_rows(tsv, count, offset)]


def encode(tokenizer, row: dict[str, str]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + end of text)."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    return prompt, [*response, tokenizer.eos_token_id]


def padded_batch(tokenizer, rows: Sequence[dict[str, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, targets): right-padded; a target is -100 except where the
    next token is a response token (or the closing end of text)."""
    pairs = [encode(tokenizer, row) for row in rows]
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        mask[i, :n] = 1
        # position t predicts id t+1: the response's ids are predicted from len(prompt)-1 on
        targets[i, len(prompt) - 1:n - 1] = torch.tensor(response)
    return ids, mask, targets


def response_loss_sum(model, tokenizer, rows: Sequence[dict[str, str]]
                      ) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the rows' response tokens, their count); fp32 softmax."""
    ids, mask, targets = padded_batch(tokenizer, rows)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def validation_loss(model, tokenizer, rows: Sequence[dict[str, str]], batch_size: int = 16
                    ) -> float:
    """The exact mean of the response-token cross-entropy over all `rows` (not a mean of
    batch means), dropout off."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        loss, n = response_loss_sum(model, tokenizer, rows[start:start + batch_size])
        total, count = total + float(loss), count + n
    return total / count


@torch.no_grad()
def exact_match(model, tokenizer, rows: Sequence[dict[str, str]], max_new_tokens: int = 3
                ) -> float:
    """The share of rows whose greedy continuation of the prompt, cut at the end of text and
    stripped, is the response stripped."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for row in rows:
        prompt, _ = encode(tokenizer, row)
        ids = torch.tensor([prompt], device=device)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        hits += tokenizer.decode(generated).strip() == row["response"].strip()
    return hits / len(rows)


def reference_gradients(model, tokenizer, rows: Sequence[dict[str, str]]
                        ) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient of one forward/backward over all `rows` at once, the loss the
    exact mean over their response tokens (what accumulation should reproduce)."""
    model.zero_grad(set_to_none=True)
    loss, count = response_loss_sum(model, tokenizer, rows)
    (loss / count).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def max_relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - e| / max|e| (bigbatch verify's measure); a tensor missing
    from `actual` is an infinite error."""
    worst = 0.0
    for name, e in expected.items():
        if name not in actual:
            return float("inf")
        scale = e.abs().max().clamp(min=torch.finfo(e.dtype).tiny)
        worst = max(worst, float((actual[name] - e).abs().max() / scale))
    return worst
