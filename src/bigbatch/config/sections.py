"""Run configuration: one frozen dataclass per section, read from TOML and `--section.field=VALUE`.

Every field carries its documentation in `metadata["doc"]` so that `bigbatch config --help-fields`
and error messages can show it. Unknown keys, wrong types and impossible values raise `UsageError`
naming the key. Only serialisable values live here; live objects are built from them elsewhere.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from bigbatch.config.fields import option, require
from bigbatch.config.model_section import ModelConfig
from bigbatch.config.units import parse_bytes
from bigbatch.optim.registry import OPTIMIZERS

AGGREGATES = ("mean", "max")


@dataclass(frozen=True)
class DataConfig:
    path: str = option("", "Text file or directory; or .jsonl / .jsonl.gz / .parquet files "
                           "(or a directory of them; text in `text_field`), a datasets "
                           "save_to_disk directory, or pre-tokenized .npy / .bin (nanoGPT, "
                           "llm.c) ids with `tokenizer`; empty means the embedded default "
                           "corpus (this Python's standard-library sources, tests excluded).")
    pattern: str = option("*", "Glob for files when `path` is a directory (searched recursively).")
    seq_len: int = option(256, "Tokens per training sequence (the model's context length).")
    vocab_size: int = option(8192, "Size of the byte-level BPE trained on the training split "
                                   "(ignored when `tokenizer` names a directory).")
    tokenizer: str = option("", "Directory of a Hugging Face tokenizer to use instead of training "
                                "one (required for pre-tokenized .npy / .bin data: the one that "
                                "made the ids).")
    bpe_sample_bytes: int | str = option("256MiB", "Text the BPE is trained on: a seeded sample "
                                                   "of about this much of the training documents "
                                                   "(all of them when the corpus is smaller); "
                                                   "bytes or a string such as \"512MiB\".")
    val_fraction: float = option(0.05, "Fraction of documents held out for validation.")
    doc_chars: int = option(16384, "Files longer than this are cut at line breaks into documents "
                                   "of about this many characters, so one big file still splits "
                                   "into training and validation documents.")
    cache_dir: str = option("", "Where tokenizers and token arrays are cached; empty means "
                                "$XDG_CACHE_HOME/bigbatch (or ~/.cache/bigbatch).")
    seq_len_warmup_tokens: int = option(0, "Sequence-length warmup: grow sequences from "
                                           "`seq_len_start` to `seq_len` over this many training "
                                           "tokens (tokens per micro-batch constant); 0 = off.")
    seq_len_start: int = option(0, "First sequence length of the warmup; must divide `seq_len` "
                                   "(lengths in between are the divisors of `seq_len`).")
    document_mask: bool = option(False, "lm: attention stays within each document of a packed "
                                        "row and learned positions restart at each document "
                                        "(rows carry position_ids); off: a token attends to "
                                        "earlier documents in its row too. Off until a "
                                        "measurement shows it pays (BENCHMARKS.md, "
                                        "bench_document_mask: so far inconclusive).")
    # train.task = "sft": `path` is a .jsonl / .json / .parquet file or a datasets directory.
    prompt_field: str = option("prompt", "sft: the field of a row's prompt (with response_field).")
    response_field: str = option("response", "sft: the field of a row's response.")
    messages_field: str = option("messages", "sft: the field of a row's chat messages "
                                             "([{role, content}], rendered with the "
                                             "tokenizer's chat template), used where present.")
    loss_on_prompt: bool = option(False, "sft: take the loss on the prompt's tokens too "
                                         "(default: the responses' only).")
    eval_generations: int = option(64, "sft: held-out examples scored at each evaluation by exact "
                                       "match of a greedy generation with the reference "
                                       "response; 0 = off.")
    packing: bool = option(True, "sft: pack examples into rows of seq_len with attention kept "
                                 "inside each (true), or pad each micro-batch of whole examples "
                                 "to its longest (false; any causal LM, no packed-sequence "
                                 "support needed; costs the padding: README, SFT).")
    # train.task = "classify": `path` is the training file (TSV, CSV or JSONL).
    text_field: str = option("text", "The JSONL key or Parquet/datasets column of the text; "
                                     "classify: also the TSV/CSV header column.")
    label_field: str = option("label", "classify: the column or JSONL key of the label.")
    val_path: str = option("", "classify, sft: validation file; empty holds out "
                               "`val_fraction` of the training file's texts (rows).")
    max_length: int = option(128, "classify: tokens per window, special tokens included; longer "
                                  "texts are split into overlapping windows.")
    stride: int = option(32, "classify: tokens shared by consecutive windows of a long text.")
    aggregate: str = option("mean", "classify: how a text's window logits become one prediction "
                                    "at evaluation: mean | max.")

    def __post_init__(self) -> None:
        require(self.seq_len >= 8, "data.seq_len", self.seq_len, "an integer >= 8")
        require(256 + 1 <= self.vocab_size <= 2**31 - 1, "data.vocab_size", self.vocab_size,
                "an integer > 256 (the byte alphabet plus merges)")
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction,
                "a number in (0, 0.5)")
        require(self.doc_chars >= 256, "data.doc_chars", self.doc_chars, "an integer >= 256")
        require(parse_bytes(self.bpe_sample_bytes, "data.bpe_sample_bytes") >= 1 << 20,
                "data.bpe_sample_bytes", self.bpe_sample_bytes, "at least 1MiB")
        require(self.seq_len_warmup_tokens >= 0, "data.seq_len_warmup_tokens",
                self.seq_len_warmup_tokens, "an integer >= 0 (0 = off)")
        require(self.seq_len_warmup_tokens == 0 or 1 <= self.seq_len_start <= self.seq_len
                and self.seq_len % self.seq_len_start == 0, "data.seq_len_start",
                self.seq_len_start, f"a divisor of data.seq_len ({self.seq_len}) when "
                "data.seq_len_warmup_tokens > 0")
        require(self.max_length >= 8, "data.max_length", self.max_length, "an integer >= 8")
        require(self.eval_generations >= 0, "data.eval_generations", self.eval_generations,
                "an integer >= 0 (0 = off)")
        require(0 <= self.stride <= self.max_length // 2, "data.stride", self.stride,
                f"an integer in [0, data.max_length / 2 = {self.max_length // 2}]")
        require(self.aggregate in AGGREGATES, "data.aggregate", self.aggregate,
                f"one of {AGGREGATES}")


RAMPS = ("linear", "doubling", "auto")


@dataclass(frozen=True)
class BatchConfig:
    global_tokens: int = option(65536, "Tokens per optimizer step across all ranks: the batch, "
                                       "said once. Micro-steps are derived from it.")
    micro_batch_size: int | str = option(16, "Sequences per forward/backward per rank: the "
                                              "memory knob; \"auto\" lets the planner choose "
                                              "it within batch.memory_budget.")
    memory_budget: int | str = option(0, "Memory per rank the auto micro-batch must fit: bytes "
                                         "or a string such as \"6GiB\"; 0 = 80% of the memory "
                                         "available now (RAM, or the GPU's free memory).")
    ramp: str = option("auto", "Batch-size ramp-up: linear (grow from `ramp_start_tokens` to "
                                 "`global_tokens` over `ramp_tokens`), doubling (double it at "
                                 "evenly spaced tokens over `ramp_tokens`) or auto (grow it by "
                                 "whole factors towards the measured gradient noise scale, never "
                                 "above `global_tokens`).")
    ramp_tokens: int = option(0, "Linear or doubling ramp: training tokens over which the batch "
                                 "grows; 0 = no such ramp.")
    ramp_start_tokens: int = option(0, "First global batch of a ramp, in tokens: a whole number "
                                       "of micro-steps across ranks (0 = one micro-step; for "
                                       "auto two, the fewest the noise scale is measured with).")
    ramp_max_growth: int = option(2, "Auto ramp: the largest whole factor one change may "
                                     "multiply the batch by (2 = it only doubles); a change "
                                     "comes at most once per 1 / (1 - noise_scale_ema) steps "
                                     "(20 at 0.95), the time the noise-scale averages take to "
                                     "re-measure at the new batch.")
    noise_scale_ema: float = option(0.95, "Decay of the moving averages behind the gradient "
                                          "noise scale (gns_* in metrics.jsonl).")
    global_sequences: int = option(0, "classify: texts per optimizer step across all ranks (all "
                                      "their windows); takes the place of global_tokens there.")
    micro_batch_tokens: int = option(0, "classify: build micro-batches to this many padded tokens "
                                        "(so short texts come more to a micro-batch) instead of "
                                        "micro_batch_size windows; 0 = off.")

    def __post_init__(self) -> None:
        require(self.global_sequences >= 0, "batch.global_sequences", self.global_sequences,
                "an integer >= 0")
        require(self.micro_batch_tokens >= 0, "batch.micro_batch_tokens",
                self.micro_batch_tokens, "an integer >= 0 (0 = off)")
        require(self.global_tokens >= 1, "batch.global_tokens", self.global_tokens,
                "a positive integer")
        require(self.micro_batch_size == "auto" or isinstance(self.micro_batch_size, int)
                and self.micro_batch_size >= 1, "batch.micro_batch_size",
                self.micro_batch_size, "a positive integer or \"auto\"")
        parse_bytes(self.memory_budget)
        require(self.ramp in RAMPS, "batch.ramp", self.ramp, f"one of {RAMPS}")
        require(self.ramp_tokens >= 0, "batch.ramp_tokens", self.ramp_tokens,
                "an integer >= 0 (0 = off)")
        require(0 <= self.ramp_start_tokens <= self.global_tokens, "batch.ramp_start_tokens",
                self.ramp_start_tokens, f"an integer in [0, batch.global_tokens = "
                f"{self.global_tokens}]")
        require(isinstance(self.ramp_max_growth, int) and self.ramp_max_growth >= 2,
                "batch.ramp_max_growth", self.ramp_max_growth, "a whole number >= 2")
        require(0 < self.noise_scale_ema < 1, "batch.noise_scale_ema", self.noise_scale_ema,
                "a number in (0, 1)")


LR_SCALINGS = ("none", "linear", "sqrt")
DECAYS = ("cosine", "linear", "constant", "wsd")
COOLDOWN_SHAPES = ("1-sqrt", "linear")
MUON_ADJUST_LRS = ("match_rms_adamw", "original")


@dataclass(frozen=True)
class OptimConfig:
    name: str = option("muon", f"Optimizer: one of {', '.join(OPTIMIZERS)} "
                                  "(optim/registry.py).")
    lr: float = option(1e-3, "Peak learning rate, reached at the end of warmup.")
    weight_decay: float = option(0.1, "Weight decay, applied to weights of 2+ dims only "
                                      "(decoupled for adamw and lamb).")
    beta1: float = option(0.9, "Adam beta1.")
    beta2: float = option(0.95, "Adam beta2.")
    eps: float = option(1e-8, "Adam epsilon (also LAMB's).")
    momentum: float = option(0.9, "Momentum of sgd and lars.")
    trust_coefficient: float = option(1e-3, "LARS trust coefficient eta (local lr = eta |w| / "
                                            "(|g| + weight_decay |w|)).")
    lr_scaling: str = option("sqrt", "Scale the peak lr with the global batch: none | linear "
                                     "(lr x B / reference) | sqrt (lr x sqrt(B / reference)).")
    reference_batch_tokens: int = option(0, "The batch, in tokens, at which `lr` is the peak "
                                            "lr; 0 = batch.global_tokens (then only a ramp "
                                            "scales it).")
    clip_norm: float = option(1.0, "Clip the global L2 norm of the gradients to this; 0 disables.")
    clip_value: float = option(0.0, "Clip every gradient element to [-v, v] (L-inf); 0 disables.")
    warmup_steps: int = option(6, "Linear warmup from ~0 to `lr` over this many steps (of "
                                   "batch.global_tokens tokens each: counted in tokens when the "
                                   "batch or sequence length ramps).")
    decay: str = option("wsd", f"Decay after warmup: one of {', '.join(DECAYS)} (wsd: "
                                  "warmup-stable-decay, the peak until the last "
                                  "`cooldown_fraction` of the steps, then a cooldown to the "
                                  "floor; Hägele et al. 2024).")
    min_lr_ratio: float = option(0.1, "Floor of the decay, as a fraction of `lr`.")
    cooldown_fraction: float = option(0.2, "wsd: the fraction of train.max_steps (counted in "
                                           "tokens, like warmup) spent cooling down to the floor.")
    cooldown_shape: str = option("1-sqrt", "wsd: the cooldown's shape: 1-sqrt (lr falls as 1 - "
                                           "sqrt(progress), Hägele et al.'s best) | linear.")
    muon_momentum: float = option(0.95, "muon: momentum of the Muon part (torch's default).")
    muon_nesterov: bool = option(True, "muon: Nesterov momentum (torch's default).")
    muon_ns_steps: int = option(5, "muon: Newton-Schulz iterations per step (torch's default; "
                                   "coefficients 3.4445, -4.775, 2.0315).")
    muon_adjust_lr: str = option(
        "match_rms_adamw", "muon: match_rms_adamw (each matrix's step is lr x 0.2 sqrt(max(A, "
                           "B)), an AdamW update's RMS, so adamw's lr and weight_decay carry "
                           "over) | original (lr x sqrt(max(1, A / B)), Keller Jordan's: wants "
                           "lr ~0.02, and torch's own default lr 1e-3 with it is ~20x too small).")

    def __post_init__(self) -> None:
        require(self.name in OPTIMIZERS, "optim.name", self.name,
                f"one of {tuple(OPTIMIZERS)}")
        require(self.lr > 0, "optim.lr", self.lr, "a positive number")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a number in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "a positive number")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a number in [0, 1)")
        require(self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient,
                "a positive number")
        require(self.lr_scaling in LR_SCALINGS, "optim.lr_scaling", self.lr_scaling,
                f"one of {LR_SCALINGS}")
        require(self.reference_batch_tokens >= 0, "optim.reference_batch_tokens",
                self.reference_batch_tokens, "an integer >= 0 (0 = batch.global_tokens)")
        require(self.clip_norm >= 0, "optim.clip_norm", self.clip_norm, "a number >= 0 (0 = off)")
        require(self.clip_value >= 0, "optim.clip_value", self.clip_value,
                "a number >= 0 (0 = off)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
                "an integer >= 0")
        require(self.decay in DECAYS, "optim.decay", self.decay, f"one of {DECAYS}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio,
                "a number in [0, 1]")
        require(0 < self.cooldown_fraction <= 1, "optim.cooldown_fraction",
                self.cooldown_fraction, "a number in (0, 1]")
        require(self.cooldown_shape in COOLDOWN_SHAPES, "optim.cooldown_shape",
                self.cooldown_shape, f"one of {COOLDOWN_SHAPES}")
        require(0 <= self.muon_momentum < 1, "optim.muon_momentum", self.muon_momentum,
                "a number in [0, 1)")
        require(1 <= self.muon_ns_steps < 100, "optim.muon_ns_steps", self.muon_ns_steps,
                "an integer from 1 to 99")
        require(self.muon_adjust_lr in MUON_ADJUST_LRS, "optim.muon_adjust_lr",
                self.muon_adjust_lr, f"one of {MUON_ADJUST_LRS}")


DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: str = option("auto", "auto (bf16 where the device multiplies it natively: CUDA from "
                                "Ampere, a CPU with AVX-512 BF16 or AMX; else fp32) | fp32 | "
                                "bf16 (autocast) | fp16 (autocast + dynamic loss scaling).")
    init_scale: float = option(2.0**16, "fp16: initial loss scale.")
    growth_factor: float = option(2.0, "fp16: scale multiplier after `growth_interval` good steps.")
    backoff_factor: float = option(0.5, "fp16: scale multiplier after an overflow.")
    growth_interval: int = option(2000, "fp16: good steps between scale increases.")
    tf32: bool = option(True, "CUDA: fp32 matmuls and convolutions run on TF32 tensor cores "
                              "(Ampere and later; 10-bit mantissa inputs, fp32 accumulation); "
                              "false keeps them in full fp32 (IEEE).")

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, "precision.dtype", self.dtype, f"one of {DTYPES}")
        require(self.init_scale > 0, "precision.init_scale", self.init_scale, "a positive number")
        require(self.growth_factor > 1, "precision.growth_factor", self.growth_factor,
                "a number > 1")
        require(0 < self.backoff_factor < 1, "precision.backoff_factor", self.backoff_factor,
                "a number in (0, 1)")
        require(self.growth_interval >= 1, "precision.growth_interval", self.growth_interval,
                "a positive integer")


ALLOCATORS = ("tuned", "system")
TASKS = ("lm", "classify", "sft")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = option(30, "Optimizer steps to train for: max_steps x batch.global_tokens "
                                "tokens when the batch or sequence length ramps.")
    target_val_loss: float = option(0.0, "Stop once the validation loss is at or below this "
                                         "(`bigbatch sweep`); 0 = off.")
    eval_every: int = option(60, "Evaluate on the validation split every this many steps "
                                 "(and at the end); 0 evaluates only at the end.")
    eval_tokens: int = option(32768, "Validation tokens per evaluation (fewer if the split is "
                                      "smaller).")
    seed: int = option(1337, "Seed for initialisation and data order.")
    log_every: int = option(1, "Print a log line every this many steps (when not on a terminal).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    max_bad_steps: int = option(20, "Stop after this many consecutive skipped (non-finite) steps.")
    allocator: str = option("tuned", "tuned: keep freed large CPU buffers mapped (glibc "
                                     "mallopt), so a step does not fault its buffers in again "
                                     "(BENCHMARKS.md); system: leave malloc alone.")
    task: str = option("lm", "lm (next-token prediction on text) | classify (sequence "
                             "classification of labelled texts; needs an hf model.source) | sft "
                             "(supervised fine-tuning of a causal LM on prompt/response or chat "
                             "rows, loss on the responses; needs an hf model.source).")
    trackers: tuple[str, ...] = option(
        ("tensorboard",), "Where rank 0 also sends every metrics.jsonl row, the resolved config "
                          "and, at the end, report.html and plan.json: any of tensorboard "
                          "(RUN_DIR/tensorboard/), wandb (offline in RUN_DIR/wandb/ unless W&B "
                          "is configured; pip install 'bigbatch[wandb]'), mlflow (RUN_DIR/mlruns/ "
                          "unless MLFLOW_TRACKING_URI is set; pip install 'bigbatch[mlflow]'); "
                          "[] for metrics.jsonl only.")

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "train.max_steps", self.max_steps, "a positive integer")
        require(self.target_val_loss >= 0, "train.target_val_loss", self.target_val_loss,
                "a number >= 0 (0 = off)")
        require(self.eval_every >= 0, "train.eval_every", self.eval_every, "an integer >= 0")
        require(self.eval_tokens >= 1, "train.eval_tokens", self.eval_tokens,
                "a positive integer")
        require(self.log_every >= 1, "train.log_every", self.log_every, "a positive integer")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                "train.device", self.device, "auto, cpu, cuda or cuda:N")
        require(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps,
                "a positive integer")
        require(self.allocator in ALLOCATORS, "train.allocator", self.allocator,
                f"one of {ALLOCATORS}")
        require(self.task in TASKS, "train.task", self.task, f"one of {TASKS}")
        for name in self.trackers:
            require(name in TRACKERS, "train.trackers", list(self.trackers),
                    f"a list of names from {TRACKERS}, e.g. [\"tensorboard\", \"wandb\"]")
        require(len(set(self.trackers)) == len(self.trackers), "train.trackers",
                list(self.trackers), "each tracker named once")


PARALLEL_STRATEGIES = ("ddp", "fsdp")
FSDP_GRADIENT_SYNCS = ("auto", "last", "every")


@dataclass(frozen=True)
class ParallelConfig:
    strategy: str = option("ddp", "With more than one rank: ddp (a full replica per rank, "
                                  "gradients all-reduced) or fsdp (FSDP2: parameters, gradients "
                                  "and optimizer state sharded over the ranks).")
    fsdp_gradient_sync: str = option(
        "auto", "FSDP under accumulation: last (reduce-scatter on the last micro-step only; each "
                "rank holds the full unsharded fp32 gradients, 4 bytes x parameters, until "
                "then) | every (reduce-scatter after every micro-step into the sharded "
                "gradients: 1/world of that memory, one reduce-scatter per micro-step) | auto "
                "(last, unless batch.micro_batch_size = \"auto\" and the planner needs every "
                "to fit).")

    def __post_init__(self) -> None:
        require(self.strategy in PARALLEL_STRATEGIES, "parallel.strategy", self.strategy,
                f"one of {PARALLEL_STRATEGIES}")
        require(self.fsdp_gradient_sync in FSDP_GRADIENT_SYNCS, "parallel.fsdp_gradient_sync",
                self.fsdp_gradient_sync, f"one of {FSDP_GRADIENT_SYNCS}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = option(1000, "Write a full-state checkpoint (RUN_DIR/checkpoints/) every "
                                    "this many optimizer steps; 0 = not by steps.")
    every_minutes: float = option(30.0, "Also write one when this many minutes have passed since "
                                        "the last; 0 = not by time.")
    keep: int = option(2, "Keep the newest this many checkpoints; older ones are deleted.")

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps,
                "an integer >= 0 (0 = off)")
        require(self.every_minutes >= 0, "checkpoint.every_minutes", self.every_minutes,
                "a number >= 0 (0 = off)")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "a positive integer")


@dataclass(frozen=True)
class Config:
    """The whole configuration, one frozen section per TOML table (load_config builds it)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
