"""The markdown section of benchmarks/bench_sft_trl.py."""

from __future__ import annotations

import argparse

NOTES = (
    "Differences the tools leave: the warmup (bigbatch's lr at step s < W is lr x (s+1)/W, "
    "transformers' lr x s/W, so TRL's first step has lr 0) and hence the cosine's phase by one "
    "step, both decaying to 0; the packed rows themselves (each tool's own best-fit decreasing "
    "over its own shuffle: the same examples, not the same rows), and a TRL row holds n ids of an "
    "n-id example where a bigbatch row holds its n - 1 (input, target) pairs, so TRL fits a few "
    "percent fewer examples a step; TRL tokenizes prompt + completion together (bigbatch apart: "
    "counted below); GPT-2's dropout (0.1) draws different masks. The same in both: fp32 on CPU "
    "(bf16 autocast / bf16=True on CUDA), AdamW with weight decay on the matrices and embeddings "
    "only (bigbatch: tensors of 2+ dims; transformers: all but biases and LayerNorm, the same "
    "set for GPT-2), gradient clipping at norm 1, sdpa attention kept within each example by "
    "restarting position_ids, loss on response tokens and the closing end of text only, no "
    "activation checkpointing (TRL's SFTConfig turns gradient_checkpointing on by default: off "
    "here, as bigbatch's model.activation_checkpointing is). TRL also computes its per-step "
    "entropy and token-accuracy metrics (its defaults, kept). Why TRL is slower here: TRL 1.16 "
    "always replaces the LM head by its chunked log-prob kernel (trl/kernels/chunked_logprob.py: "
    "log-probs, entropy and top-1 in tiles, never the whole logits), which saves memory (the "
    "peak-memory column) and, in PyTorch ops on this CPU, took 17 of 25 s of a 4-step cProfile "
    "of TRL's training (its backward tiles alone 10 s); bigbatch computes the plain "
    "cross-entropy over whole logits for a Hugging Face model.")


def arm_row(name: str, arm: dict, score: dict, device: str) -> str:
    seconds, tokens = arm["step_seconds"][1:], arm["step_tokens"][1:]
    memory = (f"{arm['cuda_peak_mib']:,.0f} MiB allocated" if device == "cuda"
              else f"{arm['peak_rss_mib']:,.0f} MiB RSS")
    return (f"| {name} | {score['val_loss']:.4f} | {score['exact_match']:.3f} | "
            f"{sum(tokens) / sum(seconds):,.0f} | {memory} | {sum(arm['step_seconds']):.1f} | "
            f"{arm['wall_s']:.0f} | {sum(arm['step_tokens']):,} |")


def gradient_lines(checked: dict) -> list[str]:
    rows = {(r["tool"], r.get("padding_free"), r["k"]): r for r in checked["results"]}
    counts = rows[("bigbatch", None, 8)]["counts"]
    per = checked["examples"] // 8
    exact = [label for (tool, padding_free, k), r in rows.items() if k == 8 and r["error"] < 1e-4
             for label in [tool + ("" if padding_free is None else
                                   " padding-free" if padding_free else " padded")]]
    lines = [
        "",
        "### Gradient accumulation against one big batch (fp32, dropout off)",
        "",
        f"{checked['examples']} examples of a harder variant (the same SST-2 reviews the other "
        "way round: prompt `Sentiment: positive\\nReview:`, the response the whole review, 1 to "
        "~60 tokens), ordered by response length; micro-batch j holds examples "
        f"{per}j..{per}j+{per - 1} of them at k = 8 (response tokens per micro-batch: "
        f"{', '.join(map(str, counts))}), all of them at k = 1. Both tools see a micro-batch as "
        "one row of its examples with restarting positions (bigbatch: its best-fit packing of "
        "those examples; TRL: `padding_free=True`, `packing=False`, a sequential sampler, the "
        "same ids pre-tokenized), or, for TRL's second row, right-padded with an attention mask. "
        "The gradient each hands its optimizer (bigbatch: `train_step`'s, as `verify` records "
        "it; TRL: read in a `TrainerCallback.on_pre_optimizer_step`, lr 0, no clipping) against "
        "one forward/backward over all the examples with the exact mean over their response "
        "tokens (the same reference for both): max over tensors of max|g - g_ref| / max|g_ref|.",
        "",
        "| tool | k = 1 | k = 8 |",
        "|---|---|---|",
    ]
    for tool, padding_free, label in (("bigbatch", None, "bigbatch (`train_step`)"),
                                      ("trl", True, "TRL `SFTTrainer`, padding-free"),
                                      ("trl", False, "TRL `SFTTrainer`, padded")):
        lines.append(f"| {label} | {rows[(tool, padding_free, 1)]['error']:.1e} | "
                     f"{rows[(tool, padding_free, 8)]['error']:.1e} |")
    verify = rows[("bigbatch", None, 8)]["verify"]
    lines += ["", f"Exact to fp32 rounding (< 1e-4) at k = 8: {', '.join(exact) or 'neither'}. "
              "TRL passes `num_items_in_batch` (the step's response-token count) to its loss, "
              "which divides each micro-batch's sum by it. For scale, the mean of the 8 micro-batch means (`mean / k`, the old "
              "transformers bug #14638) is off by "
              f"{checked['mean_over_k_error']:.2f} on these micro-batches. bigbatch's own "
              f"`bigbatch.tools.verify.verify` on its micro-batches: {verify:.1e}."]
    return lines


def render(args: argparse.Namespace, spec: dict, arms: dict, evaluation: dict,
           checked: dict | None, command: str, machine: str) -> str:
    k = spec["global_rows"] // spec["micro_rows"]
    scores = evaluation["scores"]
    worst = max(arm["other_cores"] for arm in arms.values())
    lines = [
        "## Supervised fine-tuning: bigbatch against TRL's `SFTTrainer`",
        "",
        f"`{command}` ({machine}). Other processes used up to {worst:.2f} cores during an arm"
        f"{' (busy: tokens/s are noisy)' if worst > 0.5 else ''}.",
        "",
        f"The same GPT-2 ({args.n_layer} layers, {args.d_model} wide, GPT-2 tokenizer, built "
        f"once at seed {spec['seed']} and saved), {args.train_rows:,} SST-2 training reviews as "
        "`Review: ...\\nSentiment:` -> ` positive`/` negative`, packed best-fit decreasing into "
        f"rows of {spec['seq_len']} tokens; {spec['steps']} steps of {spec['global_rows']} rows "
        f"({spec['micro_rows']} a micro-batch, k = {k}); AdamW lr {spec['lr']:g}, betas "
        f"({spec['beta1']}, {spec['beta2']}), eps {spec['eps']:g}, weight decay "
        f"{spec['weight_decay']}, {spec['warmup']} warmup steps, cosine to 0, clip 1.0. "
        f"Scored after training by the same functions on the first {evaluation['val_rows']} SST-2 "
        "dev reviews: validation loss = exact mean cross-entropy over their response tokens "
        "(and end of text); exact match = greedy answer equals the label word. tokens/s: real "
        "tokens over the optimizer steps after the first; peak memory of the arm's own process.",
        "",
        "| arm | val loss | exact match | tokens/s | peak memory | step seconds | wall s | "
        "real tokens |",
        "|---|---|---|---|---|---|---|---|",
        arm_row("bigbatch (`train.task = \"sft\"`)", arms["bigbatch"], scores["bigbatch"],
                spec["device"]),
        arm_row("TRL `SFTTrainer` (packing bfd, padding-free, completion-only loss)",
                arms["trl"], scores["trl"], spec["device"]),
        "",
        NOTES + f" Validation reviews whose joint tokenization differs from the separate one: "
        f"{evaluation['tokenized_differently']} of {evaluation['val_rows']}.",
    ]
    if checked is not None:
        lines += gradient_lines(checked)
    return "\n".join(lines)
