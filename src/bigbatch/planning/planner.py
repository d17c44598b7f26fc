"""From a Config to a MemoryPlan and back: what `bigbatch plan` prints and `bigbatch train` uses."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bigbatch.config.sections import Config
from bigbatch.config.units import format_bytes
from bigbatch.engine.precision import with_resolved_dtype
from bigbatch.errors import UsageError
from bigbatch.model.gpt import resolve_attention
from bigbatch.optim.registry import optimizer_entry, state_elements
from bigbatch.planning.budget import resolve_budget
from bigbatch.planning.memory import ModelDims, Setup
from bigbatch.planning.probe import ProbeRequest, ProbeResult, run_probe
from bigbatch.planning.search import (
    PEAK_HEADROOM,
    MemoryPlan,
    ProbeFn,
    agree_across_ranks,
    choose_micro_batch,
    sync_choices,
    tactics_for,
)
from bigbatch.tasks import task_of


def plan_for_config(cfg: Config, vocab_size: int, *, world_size: int = 1, device: str = "cpu",
                    data_bytes: int = 0, probe: ProbeFn = run_probe,
                    ranks_per_node: int | None = None) -> MemoryPlan:
    """Search the micro-batch for `cfg` (as if `batch.micro_batch_size = "auto"`).

    `ranks_per_node` (default: torchrun's LOCAL_WORLD_SIZE, else all `world_size` ranks on this
    node) divides a CPU node's default budget among its ranks."""
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device_type, _, index = device.partition(":")
    cfg = with_resolved_dtype(cfg, torch.device(device))[0]
    if cfg.model.source != "gpt":  # a Hugging Face model: its own dimensions, probed as itself
        from bigbatch.planning.hf_probe import hf_dims

        cfg = task_of(cfg).planning_config(cfg)
        dims = hf_dims(cfg, cfg.data.seq_len)
        gpt_probe = probe

        def probe(request: ProbeRequest) -> ProbeResult:
            return gpt_probe(dataclasses.replace(
                request, model_source=cfg.model.source, task=cfg.train.task,
                trust_remote_code=cfg.model.trust_remote_code))
    else:
        dims = ModelDims(vocab_size, cfg.data.seq_len, cfg.model.n_layer, cfg.model.d_model,
                         cfg.model.n_head, resolve_attention(cfg.model.attention, device_type,
                                                           cfg.precision.dtype))
    if cfg.model.adapter != "none":  # the probes build the adapted model; the terms count P_t
        dims = dataclasses.replace(dims, trainable_parameters=count_trainable(cfg, dims))
        adapter = tuple((f.name, getattr(cfg.model, f.name))
                        for f in dataclasses.fields(cfg.model) if f.name in ADAPTER_KEYS)
        unadapted_probe = probe

        def probe(request: ProbeRequest) -> ProbeResult:
            return unadapted_probe(dataclasses.replace(request, adapter=adapter))
    # The probes build the run's optimizer; the terms count its state per parameter, on the
    # model itself when its parts keep different state for different parameters.
    optimizer = tuple((f.name, getattr(cfg.optim, f.name)) for f in dataclasses.fields(cfg.optim))
    state_elements = (None if optimizer_entry(cfg.optim.name).uniform_state_tensors is not None
                      else count_optimizer_state(cfg, dims))
    configured_probe = probe

    def probe(request: ProbeRequest) -> ProbeResult:
        return configured_probe(dataclasses.replace(request, optimizer=optimizer))
    budget = resolve_budget(cfg.batch.memory_budget, device_type, int(index) if index else None,
                            ranks_per_node)
    loss_kernel = "standard"
    if cfg.model.source == "gpt":
        from bigbatch.engine.fused_loss import resolve_loss_kernel

        loss_kernel = resolve_loss_kernel(cfg.model.loss_kernel, dims.vocab_size,
                                          cfg.parallel.strategy, world_size, device_type)
    base = Setup(micro_batch_size=1, precision=cfg.precision.dtype, optimizer=cfg.optim.name,
                 world_size=world_size, strategy=cfg.parallel.strategy, data_bytes=data_bytes,
                 loss_kernel=loss_kernel, optimizer_state_elements=state_elements)
    model = cfg.model
    # FSDP on CPU is probed under the wrapper (search.py says why), on world_size gloo ranks of
    # this node: only where they all fit on it (one node), or the probe would hold the memory
    # of more ranks than the node was budgeted for. Under torchrun rank 0 alone runs them.
    wrapped = (device_type == "cpu" and cfg.parallel.strategy == "fsdp"
               and 1 < world_size <= ranks_per_node)

    def search() -> MemoryPlan:
        return choose_micro_batch(dims, base, global_tokens=cfg.batch.global_tokens,
                                  mode=model.activation_checkpointing,
                                  checkpoint_every=model.checkpoint_every,
                                  loss_chunk_tokens=model.loss_chunk_tokens, budget=budget,
                                  device=device, allocator=cfg.train.allocator, probe=probe,
                                  gradient_sync=cfg.parallel.fsdp_gradient_sync,
                                  wrapped_probe=wrapped)

    plan = on_rank_zero(search) if wrapped else search()
    tactics = tactics_for(model.activation_checkpointing, model.checkpoint_every,
                          model.loss_chunk_tokens, cfg.data.seq_len,
                          sync_choices(cfg.parallel.strategy, world_size,
                                       cfg.parallel.fsdp_gradient_sync))
    if cfg.model.source != "gpt" and plan.loss_chunk_tokens:
        raise UsageError(f"batch.memory_budget = {format_bytes(budget)} is too small for this "
                         "model without chunked loss, which Hugging Face models lack: raise the "
                         "budget or give a smaller data.seq_len / data.max_length")
    return agree_across_ranks(plan, tactics)


def on_rank_zero(search: Callable[[], MemoryPlan]) -> MemoryPlan:
    """`search()` on rank 0 alone (its probes are a group of their own), its plan or its
    UsageError broadcast to every rank; outside torchrun, just `search()`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return search()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = search()
        except UsageError as err:
            box[0] = str(err)  # every rank refuses, with rank 0's reason
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise UsageError(box[0])
    return box[0]


ADAPTER_KEYS = ("adapter", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def meta_model(cfg: Config, dims: ModelDims) -> torch.nn.Module:
    """`cfg`'s (adapted) model built on the meta device: shapes only, no memory, no weights
    read."""
    from bigbatch.model.adapters import apply_adapter

    with torch.device("meta"):
        if cfg.model.source == "gpt":
            from bigbatch.model.gpt import GPT, GPTShape

            model = GPT(GPTShape(dims.vocab_size, dims.seq_len, dims.n_layer, dims.n_head,
                                 dims.d_model))
        else:
            from bigbatch.planning.hf_probe import hf_model_from_config

            model = hf_model_from_config(cfg)
        return apply_adapter(model, cfg.model, task_of(cfg).model_head)


def count_trainable(cfg: Config, dims: ModelDims) -> int:
    """The trainable parameters of `cfg`'s adapted model, counted on the meta model."""
    from bigbatch.model.adapters import parameter_counts

    return parameter_counts(meta_model(cfg, dims))[0]


def count_optimizer_state(cfg: Config, dims: ModelDims) -> int:
    """The fp32 elements of state `optim.name` keeps for the meta model's trainable parameters,
    per parameter as the registry says (a combination: each parameter's part)."""
    return state_elements(cfg.optim.name, meta_model(cfg, dims))


def apply_plan(cfg: Config, plan: MemoryPlan) -> Config:
    """The config with the plan's micro-batch, checkpointing, loss chunking and (FSDP) gradient
    sync filled in."""
    parallel = cfg.parallel
    if parallel.fsdp_gradient_sync == "auto" and plan.strategy == "fsdp" and plan.world_size > 1:
        parallel = dataclasses.replace(parallel, fsdp_gradient_sync=plan.fsdp_gradient_sync)
    return dataclasses.replace(
        cfg, batch=dataclasses.replace(cfg.batch, micro_batch_size=plan.micro_batch_size),
        model=dataclasses.replace(cfg.model, activation_checkpointing=plan.activation_checkpointing,
                                  checkpoint_every=plan.checkpoint_every,
                                  loss_chunk_tokens=plan.loss_chunk_tokens),
        parallel=parallel)


def write_plan(plan: MemoryPlan, out_dir: Path) -> Path:
    path = out_dir / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return path


def _speed(candidate: dict) -> str:
    if candidate["note"]:
        return candidate["note"]
    if candidate["tokens_per_s"] is None:
        return "not measured"
    return f"{candidate['tokens_per_s']:,.0f} tokens/s"


def describe_plan(plan: MemoryPlan) -> list[str]:
    """The plan, explained: batch arithmetic, memory by component against the budget, probes."""
    global_sequences = plan.global_tokens // plan.seq_len
    chunk = (f"in slices of {plan.loss_chunk_tokens} tokens" if plan.loss_chunk_tokens
             else "whole (logits materialised)")
    every = f" (every {plan.checkpoint_every})" if plan.activation_checkpointing == "every_n" \
        else ""
    lines = [
        f"global batch: {plan.global_tokens:,} tokens = {global_sequences} sequences x "
        f"{plan.seq_len} tokens (fixed)",
        f"per rank: {plan.sequences_per_rank} sequences on each of {plan.world_size} rank(s) "
        f"({plan.strategy})",
        f"micro-batch: {plan.micro_batch_size} sequences x {plan.num_micro_steps} micro-steps",
        f"activation checkpointing: {plan.activation_checkpointing}{every}; loss: {chunk}",
        f"predicted peak: {format_bytes(plan.predicted_peak_bytes)} of a "
        f"{format_bytes(plan.budget_bytes)} budget on {plan.device} "
        f"({100 * plan.predicted_peak_bytes / plan.budget_bytes:.0f}%; a plan keeps "
        f"{100 * PEAK_HEADROOM:.0f}% of its peak as headroom)",
    ]
    lines += [f"  {name:<16} {format_bytes(size):>12}" for name, size in plan.components.items()]
    cal = plan.calibration
    lines.append(f"calibration: {cal['source']}: overhead {format_bytes(cal['overhead_bytes'])}, "
                 f"activation scale {cal['activation_scale']:.2f}"
                 + (f" (probes ran FSDP itself on {plan.world_size} gloo ranks: on CPU its "
                    "heap keeps more than its live tensors)" if plan.probed_under_wrapper else ""))
    lines.append(f"candidates (tried: {'; '.join(plan.tactics_tried)}):")
    for c in plan.candidates:
        measured = format_bytes(c["measured_bytes"]) if c["measured_bytes"] else "-"
        mark = "<- chosen" if c["micro_batch_size"] == plan.micro_batch_size else ""
        lines.append(f"  micro-batch {c['micro_batch_size']:>4}: predicted "
                     f"{format_bytes(c['predicted_bytes']):>11}, measured {measured:>11}, "
                     f"{_speed(c)} {mark}".rstrip())
    if plan.world_size > 1:
        lines += describe_wrapper(plan)
    return lines


def describe_wrapper(plan: MemoryPlan) -> list[str]:
    """What the wrapper changes against one unwrapped rank, term by term, and its traffic."""
    if plan.strategy == "fsdp":
        how = (f"FSDP over {plan.world_size} ranks, gradients reduce-scattered on "
               f"{'every' if plan.fsdp_gradient_sync == 'every' else 'the last'} micro-step")
        traffic = ("parameters all-gathered twice per micro-step, gradients reduce-scattered "
                   + ("every micro-step" if plan.fsdp_gradient_sync == "every" else
                      "once per step"))
    else:
        how = f"DDP over {plan.world_size} ranks"
        traffic = "gradients all-reduced once per step thanks to no_sync"
    one = plan.one_rank_components
    lines = [f"against 1 rank ({how}), per rank:"]
    for name, size in plan.components.items():
        if one and size != one.get(name, size):
            lines.append(f"  {name:<16} {format_bytes(size):>12} instead of "
                         f"{format_bytes(one[name]):>12} ({'+' if size > one[name] else '-'}"
                         f"{format_bytes(abs(size - one[name]))})")
    if one:
        total, single = sum(plan.components.values()), sum(one.values())
        lines.append(f"  {'total':<16} {format_bytes(total):>12} instead of "
                     f"{format_bytes(single):>12}")
    lines.append(f"communication per optimizer step: {format_bytes(plan.allreduce_bytes_per_step)}"
                 f" sent per rank (ring; {traffic})")
    return lines


def probe_device(name: str, local_rank: int = 0) -> str:
    """`train.device` as the probe's device string ("auto" -> cuda:N where there is one)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if name == "cuda" else name


def plan(cfg: Config, world_size: int = 1, device: str | None = None) -> MemoryPlan:
    """The micro-batch (and activation checkpointing, chunked loss) that fits
    `batch.memory_budget` for `cfg` on `world_size` ranks, measured by short probes on
    `device` (default: the one `train.device` names). `describe_plan(plan)` explains it."""
    # The logits' width is the tokenizer's real vocabulary: a local tokenizer directory has its
    # own size, whatever data.vocab_size says (that only sizes a BPE bigbatch trains itself).
    vocab_size = cfg.data.vocab_size
    if cfg.data.tokenizer:
        from bigbatch.data.tokenizer import load_tokenizer_dir

        vocab_size = load_tokenizer_dir(cfg.data.tokenizer).get_vocab_size()
    return plan_for_config(cfg, vocab_size, world_size=world_size,
                           device=probe_device(cfg.train.device) if device is None else device)
