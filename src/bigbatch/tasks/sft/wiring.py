"""The wiring of `train.task = "sft"`: prompt/response or chat rows, a pretrained causal LM (a
Hugging Face model, or a bigbatch GPT after `bigbatch export RUN --format hf`), the loss on
response tokens only, examples packed into rows with document masking (or, with
`data.packing = false`, padded in token-budget micro-batches: padding.py), and evaluation by
response loss and exact match. The rest (devices, ranks, optimizer, checkpoints, the loop) is
train()'s, as for every task."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigbatch.batch import split_batch
from bigbatch.config.sections import Config
from bigbatch.engine.batch_schedule import build_batch_schedule
from bigbatch.engine.loop import TrainState, evaluate
from bigbatch.engine.noise_scale import noise_scale_summary
from bigbatch.engine.seeding import seed_everything, seed_rank_streams
from bigbatch.engine.step import lm_loss_sum
from bigbatch.engine.throughput import flops_per_token
from bigbatch.errors import UsageError
from bigbatch.model.adapters import apply_adapter, describe_parameters, parameter_counts
from bigbatch.model.hf import HFSource, describe_hf_model, load_tokenizer, parse_source, text_dims
from bigbatch.model.hf_lm import build_hf_lm, require_packed_sequences, save_hf_model
from bigbatch.tasks.base import TaskContext, TaskRun, hold_out
from bigbatch.tasks.sft.evaluation import exact_match
from bigbatch.tasks.sft.examples import Example, Fields, read_rows, row_shape, tokenize_rows
from bigbatch.tasks.sft.loader import SFTLoader, eval_batches
from bigbatch.tasks.sft.packing import PackedRows, pack_examples
from bigbatch.tasks.sft.padding import (
    PaddedExamples,
    PaddedLoader,
    describe_padded_batch,
    pad_examples,
    padded_eval_batches,
)

MODEL_HEAD = "causal-lm"  # the Task's model_head (tasks/sft/__init__.py), said here too


@dataclass
class SFTData:
    train: PackedRows | PaddedExamples  # PaddedExamples with data.packing = false
    val: PackedRows | PaddedExamples
    val_examples: list[Example]  # for exact match
    tokenizer: object
    eot_id: int


def check_config(cfg: Config) -> HFSource:
    source = parse_source(cfg.model.source)
    if source is None:
        raise UsageError("train.task = 'sft' fine-tunes a pretrained causal LM: model.source = "
                         "hf:DIR (a Hugging Face model, or a bigbatch GPT after `bigbatch export "
                         "RUN --format hf`) or hf-config:FILE")
    if not cfg.data.path:
        raise UsageError("train.task = 'sft' needs data.path: a .jsonl, .json or .parquet file "
                         "(or a datasets directory) of prompt/response or messages rows")
    if cfg.data.seq_len_warmup_tokens:
        raise UsageError("data.seq_len_warmup_tokens: train.task = 'sft' packs whole examples "
                         "into rows of data.seq_len, which a shorter sequence would cut; set 0")
    if cfg.model.loss_chunk_tokens or cfg.model.loss_kernel == "fused":
        raise UsageError("model.loss_chunk_tokens and model.loss_kernel = 'fused' are for the "
                         "built-in GPT: set 0 and 'auto' for train.task = 'sft'")
    return source


def first_within(examples: list[Example], budget: int) -> list[Example]:
    """The leading examples whose tokens fit `budget` (at least one): the fixed validation set,
    like the language model's `train.eval_tokens`."""
    lengths = np.cumsum([len(e.ids) - 1 for e in examples])
    return examples[:max(1, int(np.searchsorted(lengths, budget, side="right")))]


def load_data(cfg: Config, source: HFSource) -> SFTData:
    data = cfg.data
    tokenizer = load_tokenizer(source, data.tokenizer, cfg.model.trust_remote_code)
    eot_id = tokenizer.eos_token_id
    if eot_id is None:
        raise UsageError("the tokenizer has no end-of-sequence token (eos_token): SFT appends it "
                         "to every response so the model learns to stop; give one that has it")
    fields = Fields(data.prompt_field, data.response_field, data.messages_field)
    path = Path(data.path).expanduser()
    rows = read_rows(path)
    shape = row_shape(rows, fields, path)
    if data.val_path:
        val_rows = read_rows(Path(data.val_path).expanduser())
    else:
        keep, held = hold_out(len(rows), data.val_fraction, cfg.train.seed)
        rows, val_rows = [rows[i] for i in keep], [rows[i] for i in held]

    def tokenized(some: list[dict]) -> list[Example]:
        return tokenize_rows(some, fields, tokenizer, shape=shape, eot_id=eot_id,
                             loss_on_prompt=data.loss_on_prompt)

    train, val = tokenized(rows), tokenized(val_rows)
    val = first_within(val, cfg.train.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id

    def batched(examples: list[Example], seed: int) -> PackedRows | PaddedExamples:
        pairs = [(e.ids, e.loss) for e in examples]
        if not data.packing:
            return pad_examples(pairs, data.seq_len, pad_id)
        return pack_examples(pairs, data.seq_len, pad_id, seed)

    return SFTData(batched(train, cfg.train.seed), batched(val, 0),
                   val[:data.eval_generations], tokenizer, eot_id)


def prepare(cfg: Config, ctx: TaskContext) -> TaskRun:
    source = check_config(cfg)
    dist, device, say = ctx.dist, ctx.device, ctx.say
    started = time.perf_counter()
    data = load_data(cfg, source)
    vocab_size = len(data.tokenizer)
    train = data.train
    layout = (f"packed into {len(train.inputs):,} rows of {cfg.data.seq_len} tokens "
              f"({100 * train.fill:.1f}% filled)" if cfg.data.packing else
              f"of {train.lengths.mean():.1f} tokens on average, padded per micro-batch "
              "(data.packing = false)")
    say(f"data: {train.examples:,} training examples {layout}, {data.val.examples:,} "
        f"validation examples ({time.perf_counter() - started:.1f}s)")
    for name, rows in (("training", train), ("validation", data.val)):
        if rows.truncated:  # never silently: the cut tokens carry no loss
            say(f"data: {rows.truncated:,} {name} examples are longer than data.seq_len = "
                f"{cfg.data.seq_len} tokens and were cut to it")
    if cfg.batch.micro_batch_size == "auto":
        cfg = ctx.plan_micro_batch(cfg, vocab_size, (train.nbytes if not cfg.data.packing
                                                      else train.inputs.nbytes * 3))
    split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                        dist.world_size)
    schedule = build_batch_schedule(cfg, split)
    seed_everything(cfg.train.seed)
    model = build_hf_lm(cfg, source, vocab_size)
    if cfg.data.packing:  # packed rows: documents kept apart by their positions
        require_packed_sequences(model, cfg.model.source)
    model = apply_adapter(model, cfg.model, MODEL_HEAD).to(device)
    seed_rank_streams(cfg.train.seed, dist.rank)
    if cfg.data.packing:
        loader = SFTLoader(train, split, dist.rank, cfg.train.seed)
        val_batches = eval_batches(data.val, split.micro_batch_size, dist.rank, dist.world_size)
    else:
        loader = PaddedLoader(train, split, dist.rank, cfg.train.seed)
        val_batches = padded_eval_batches(data.val, split.micro_batch_tokens, dist.rank,
                                          dist.world_size)
    answers = [e for e in data.val_examples if e.answer is not None]
    max_new_tokens = 1 + max((len(data.tokenizer(e.answer, add_special_tokens=False)["input_ids"])
                              for e in answers), default=0)
    last: dict[str, float] = {}

    def evaluation(model: nn.Module) -> dict[str, float]:
        last["val_loss"] = evaluate(model, val_batches, ctx.precision, dist, device, lm_loss_sum)
        if answers:
            last["val_exact_match"] = exact_match(
                model, answers, data.tokenizer.decode, data.eot_id, max_new_tokens,
                cfg.data.seq_len, ctx.precision, dist, device)
        return dict(last)

    def save(model: nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_hf_model(model, cfg, source, out_dir, weights)

    def end_lines(state: TrainState) -> list[str]:
        match = (f", exact match {last['val_exact_match']:.4f} over {len(answers)} examples "
                 "(greedy)" if "val_exact_match" in last else "")
        return [noise_scale_summary(state.batch_tokens, state.noise.noise_scale),
                f"validation: response loss {last.get('val_loss', float('nan')):.4f} nats/token"
                f"{match}",
                f"outputs: {ctx.out_dir}/ (Hugging Face model + tokenizer, metrics.jsonl, "
                "config.toml)"]

    dims = text_dims(source, cfg.model.trust_remote_code)
    return TaskRun(
        cfg=cfg, schedule=schedule, model=model, loader=loader, evaluate=evaluation,
        start_lines=[describe_hf_model(model, source), describe_parameters(model),
                     f"batch: {split.describe() if cfg.data.packing else describe_padded_batch(split)}",
                     "loss: response tokens only" + (" and prompts (data.loss_on_prompt)"
                                                     if cfg.data.loss_on_prompt else "")
                     + ", exact mean over the step; " + (
                         "attention within each packed example" if cfg.data.packing else
                         "each example padded alone, micro-batches of up to "
                         f"{split.micro_batch_tokens:,} padded tokens")],
        save=save, end_lines=end_lines, loss_sum_fn=lm_loss_sum,
        num_parameters=parameter_counts(model)[1],
        num_trainable_parameters=parameter_counts(model)[0],
        flops_per_token=flops_per_token(dims["n_layer"], dims["d_model"], vocab_size,
                                        cfg.data.seq_len))
