"""The report's summary: numbers computed from a run, each as display text."""

from __future__ import annotations

import math

from safetensors import safe_open

from bigbatch.engine.throughput import flops_per_token
from bigbatch.model.adapters import ADAPTER_FILE
from bigbatch.report.data import RunData, weights_files


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s" if hours else \
        f"{rest // 60}m {rest % 60:02d}s"


def _fmt_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{count:,.0f} B"


def status(run: RunData) -> tuple[str, str]:
    """(css class, sentence): finished, stopped early (and why, when known), or not started."""
    sessions = run.info.get("sessions") or [{}]
    ended = sessions[-1].get("ended")
    if run.finished:
        return "ok", f"finished: {run.last_step} of {run.max_steps} steps"
    if ended == "finished" and run.has_model:  # before max_steps: train.target_val_loss reached
        return "ok", (f"finished at step {run.last_step} of {run.max_steps}: the validation loss "
                      f"reached train.target_val_loss = {run.setting('train', 'target_val_loss')}")
    if not run.train_rows:
        return "warn", "no training step logged: the run stopped (or is still starting) " \
                       "before its first step"
    if run.max_steps is not None and run.last_step >= run.max_steps:
        missing = " or ".join(weights_files(run.config))
        return "warn", (f"all {run.last_step} steps ran, but {missing} is missing (stopped "
                        "while saving the model, or moved away)")
    why = {None: "no clean stop recorded: killed, or still running",
           "finished": "finished"}.get(ended, f"stopped by {ended}")
    return "warn", (f"stopped early at step {run.last_step} of {run.max_steps or '?'} ({why}); "
                    "`bigbatch train` with the same arguments and --resume auto continues it")


def mean_tokens_per_s(run: RunData) -> float | None:
    """Tokens over seconds of the timed steps, the first step (warm-up) left out when others
    exist: a time-weighted mean, not a mean of per-step rates."""
    timed = [row for row in run.train_rows if row.get("step_seconds")]
    if len(timed) > 1:
        timed = timed[1:]
    seconds = sum(row["step_seconds"] for row in timed)
    if not seconds:
        return None
    # A step's tokens are its logged rate x its seconds (engine/loop.py logs step tokens /
    # step_seconds), for every task: `global_tokens` counts texts in a classification run.
    tokens = sum(row.get("tokens_per_s", 0.0) * row["step_seconds"] for row in timed)
    return tokens / seconds


def num_parameters(run: RunData) -> int | None:
    if "num_parameters" in run.info:
        return run.info["num_parameters"]
    if (run.run_dir / "model.safetensors").is_file():
        with safe_open(str(run.run_dir / "model.safetensors"), framework="numpy") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return None


def trainable_text(run: RunData) -> str | None:
    """", of which N trainable" where adapters froze the rest (model.adapter); None otherwise."""
    trainable = run.info.get("num_trainable_parameters")
    adapter = run.config.get("model", {}).get("adapter", "none")
    if trainable is None and adapter != "none" and (run.run_dir / ADAPTER_FILE).is_file():
        with safe_open(str(run.run_dir / ADAPTER_FILE), framework="numpy") as f:
            trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    if trainable is None or trainable == run.info.get("num_parameters"):
        return None
    return f"{trainable:,} trainable ({trainable / 1e6:.3f}M: {adapter} adapters)"


def model_flops_per_token(run: RunData) -> int | None:
    if "flops_per_token" in run.info:
        return run.info["flops_per_token"]
    model, data = run.config.get("model", {}), run.config.get("data", {})
    if model.get("source", "gpt") != "gpt":  # another architecture: the GPT formula is not it
        return None
    vocab = (run.model_shape or {}).get("vocab_size", data.get("vocab_size"))
    if None in (model.get("n_layer"), model.get("d_model"), vocab, data.get("seq_len")):
        return None
    return flops_per_token(model["n_layer"], model["d_model"], vocab, data["seq_len"])


def throughput_text(run: RunData) -> tuple[str, str]:
    """(mean tokens/s, model FLOP/s and MFU) as text."""
    speed = mean_tokens_per_s(run)
    if speed is None:
        return "—", "—"
    fpt = model_flops_per_token(run)
    if fpt is None:
        return f"{speed:,.0f}", "— (model shape unknown)"
    achieved = speed * fpt
    text = f"{achieved / 1e12:.3g} model TFLOP/s ({fpt / 1e6:.2f} MFLOP/token)"
    peak = run.info.get("matmul_peak_flops")
    if peak:
        world = run.info.get("world_size", 1)
        text += (f"; MFU {100 * achieved / (peak * world):.1f} % of a quick "
                 f"{run.info.get('matmul_peak_dtype', '')} matmul peak of {peak / 1e12:.3g} "
                 f"TFLOP/s{' per rank' if world > 1 else ''} measured at start (a lower bound "
                 "of the peak, so MFU is at most this)")
    else:
        text += "; MFU needs the hardware's matmul peak, which this run did not record"
    return f"{speed:,.0f}", text


def text_batch_text(run: RunData) -> str:
    """A classification run's batch: texts, their windows cut into micro-batches by length
    (tasks/classify/data.py)."""
    texts = run.setting("batch", "global_sequences")
    if not texts:
        return "—"
    budget = run.setting("batch", "micro_batch_tokens", 0)
    last = run.train_rows[-1] if run.train_rows else {}
    cut = (f"micro-batches of up to {budget:,} padded tokens" if budget
           else f"micro-batches of {run.setting('batch', 'micro_batch_size', '?')} windows")
    steps = (f" ({last['num_micro_steps']} of them at the last step)"
             if "num_micro_steps" in last else "")
    return f"{texts:,} texts (all their windows), {cut}{steps}"


def batch_text(run: RunData) -> str:
    if run.unit == "texts":
        return text_batch_text(run)
    tokens = run.setting("batch", "global_tokens")
    seq_len = run.setting("data", "seq_len")
    last = run.train_rows[-1] if run.train_rows else {}
    tokens = last.get("global_tokens", tokens)
    seq_len = last.get("seq_len", seq_len)
    if not tokens or not seq_len:
        return "—"
    text = f"{tokens:,} tokens = {tokens // seq_len} sequences x {seq_len} tokens"
    micro, steps = last.get("micro_batch_size"), last.get("num_micro_steps")
    if micro and steps:
        world = max(1, tokens // (seq_len * micro * steps))
        text += (f" = micro-batch {micro} x {steps} micro-steps x {world} rank"
                 f"{'s' if world > 1 else ''}")
    if len({row.get("global_tokens", tokens) for row in run.train_rows}) > 1:
        text += " (at the last step: the batch was ramped, see the batch schedule plot)"
    return text


def plan_text(run: RunData) -> str:
    if run.plan is None:
        micro = run.setting("batch", "micro_batch_size")
        return f"none: micro-batch {micro} set in the config"
    p = run.plan
    return (f"micro-batch {p.get('micro_batch_size')} x {p.get('num_micro_steps')} micro-steps, "
            f"activation checkpointing {p.get('activation_checkpointing')}, predicted peak "
            f"{_fmt_bytes(p.get('predicted_peak_bytes', 0))} of a "
            f"{_fmt_bytes(p.get('budget_bytes', 0))} budget on {p.get('device')}")


def duration_text(run: RunData) -> str:
    sessions = run.info.get("sessions") or []
    closed = [s["seconds"] for s in sessions if s.get("seconds") is not None]
    steps = sum(row.get("step_seconds", 0.0) for row in run.train_rows)
    if closed:
        text = _fmt_seconds(sum(closed))
        if len(sessions) > 1:
            text += f" over {len(sessions)} sessions (resumed)"
        if len(closed) < len(sessions):
            open_ = len(sessions) - len(closed)
            text += (f" (+ {open_} session{'s' if open_ > 1 else ''} without an end: killed, "
                     "or still running)")
        return f"{text}; {_fmt_seconds(steps)} in optimizer steps"
    return f"{_fmt_seconds(steps)} in optimizer steps (whole-run time not recorded)"


def validation_text(run: RunData) -> tuple[str, str]:
    _, values = run.series("val_loss")
    if not values:
        return "— (no validation rows)", "—"
    evals = [row for row in run.rows if "val_loss" in row]
    best = min(evals, key=lambda row: row["val_loss"])
    unigram = run.info.get("unigram_val_loss")
    baseline = f" (a unigram model: {unigram:.4f})" if unigram is not None else ""
    return (f"{values[-1]:.4f} nats/{run.unit_singular} at step {evals[-1]['step']}{baseline}",
            f"{best['val_loss']:.4f} at step {best['step']}")


def noise_scale_text(run: RunData) -> str | None:
    rows = [row for row in run.rows if isinstance(row.get("gns_tokens"), int | float)]
    if not rows:
        return None
    batch = rows[-1].get("global_tokens", run.setting("batch", "global_tokens"))
    return (f"{rows[-1]['gns_tokens']:,.0f} {run.unit} at step {rows[-1].get('step', '?')} "
            f"(global batch then: {batch:,} {run.unit})")


def data_text(run: RunData) -> str:
    path = run.setting("data", "path", "")
    if run.unit == "texts":
        return (f"{path}; windows of {run.setting('data', 'max_length', '?')} tokens, "
                f"stride {run.setting('data', 'stride', '?')}")
    vocab = (run.model_shape or {}).get("vocab_size", run.setting("data", "vocab_size", "?"))
    return (f"{path or 'the embedded standard-library corpus'}; seq_len "
            f"{run.setting('data', 'seq_len', '?')}, vocab {vocab}")


def summarize(run: RunData) -> dict[str, str]:
    """The summary table of one run, label -> text, in reading order."""
    model = run.config.get("model", {})
    params = num_parameters(run)
    final_val, best_val = validation_text(run)
    speed, flops = throughput_text(run)
    last = run.train_rows[-1] if run.train_rows else {}
    summary = {
        "status": status(run)[1],
        "model": (f"GPT, {model.get('n_layer', '?')} layers, d_model {model.get('d_model', '?')}, "
                  f"{model.get('n_head', '?')} heads" if model.get("source", "gpt") == "gpt"
                  else str(model["source"])),
        "parameters": ", ".join(filter(None, [f"{params:,} ({params / 1e6:.2f}M)" if params
                                              else "—", trainable_text(run)])),
        "data": data_text(run),
        "global batch": batch_text(run),
        "plan": plan_text(run),
        "precision": str(run.setting("precision", "dtype", "—")),
        "hardware": (f"{run.info['hardware']}; torch {run.info.get('torch', '?')}"
                     if "hardware" in run.info else "— (no run_info.json)"),
        "duration": duration_text(run),
        "final validation loss": final_val,
        "best validation loss": best_val,
        "final training loss": f"{last['loss']:.4f}" if last else "—",
        "tokens seen": f"{last.get('tokens', 0):,} {run.unit} in {run.last_step} steps",
        "mean tokens/s": speed,
        "model FLOP/s, MFU": flops,
    }
    if (noise := noise_scale_text(run)) is not None:  # only where it was measured
        summary["gradient noise scale"] = noise
    return summary
