"""The memory model of one training rank, in pure functions: bytes at the step's peak, by component.

Notation: P parameters (tied embedding counted once), V vocabulary, T sequence length, C width,
H heads, L blocks, b micro-batch, N = b * T tokens per micro-step, a the bytes of one activation
element (4 in fp32; 2 under bf16/fp16 autocast, which keeps parameters in fp32 and casts).

Static (alive the whole step, from the second step on, when the optimizer state exists):
    parameters        4 P                     (fp32, the master weights themselves)
    gradients         4 P_t                   (fp32, accumulated across micro-steps)
    optimizer state   s x 4 P_t               (s fp32 tensors of each parameter's size, as the
                                               optimizer registry says: AdamW and LAMB 2, the
                                               moments; SGD and LARS 1, momentum; a combination
                                               counts each parameter's part, per parameter)
                      P_t: the trainable parameters, P itself unless adapters (LoRA) freeze
                      the base; the same P_t replaces P in the DDP buckets and in FSDP's
                      gradient terms below
    autocast copies   2 x (Linear params)     (bf16/fp16 only: the casts autocast makes of every
                                               Linear weight and bias, lm_head included, saved
                                               for backward until the micro-step's backward ends)
    DDP buckets       4 P_t                   (world size > 1 with DDP: flat gradient buckets)
    FSDP (N ranks)    parameters 4 P / N sharded, plus the gathered units: the root's
                      (embeddings, final norm: R = P - L x block, gathered from forward to the
                      end of backward) and two layers' (the one running and the one prefetched),
                      in g bytes each (g = 2 under bf16: FSDP's MixedPrecisionPolicy gathers
                      bf16; else 4);
                      gradients: with sync "last" and k > 1 micro-steps, the full unsharded fp32
                      gradients accumulated across the no-sync micro-steps, 4 P; else (sync
                      "every", or k = 1) the sharded 4 P / N plus the root's and one layer's
                      unsharded gradients in flight (g R + (g + 4) block under bf16: the bf16
                      gradient and its fp32 cast for the reduce-scatter);
                      optimizer state / N; no autocast copies under bf16 (the gathered weights
                      are bf16 already); under fp16 autocast keeps its copies of every gathered
                      Linear weight for the whole step (2 x Linear params)
    data              the token arrays of the run (memmapped pages count in resident memory)
Per token (saved for backward, measured with saved-tensor hooks on the real Block):
    block             2 x 4C  fp32 inputs of the two LayerNorms (the residual stream)
                      + 16    LayerNorm mean and rstd, fp32, two norms
                      + 4H    SDPA log-sum-exp (fp32, per head), or, with the explicit
                              attention kernel, H T a (each head's softmax probabilities)
                      + 14C a LN outputs C + C, q/k/v 3C, attention output C, MLP 4C + 4C
    final             4C + 8 + C a (ln_f input and stats, lm_head input) + 16 (int64 ids, targets)
    logits + loss     12 V    at the start of backward: the fp32 log-softmax output, its incoming
                              gradient and the gradient it produces (the forward holds less:
                              logits, their fp32 upcast, the log-softmax output)
With LoRA the activations stay those above: a frozen projection no longer saves its input for
its weight's gradient, but its adapter's A saves the same input (its dropout's output, a copy,
when model.lora_dropout > 0), and backward still runs through every frozen layer. The r-wide
adapter intermediates are small (r << C); the probe, which measures the adapted model itself,
calibrates what the formula leaves out.
Checkpointing keeps only each checkpointed block's input (4C) and recomputes one block at a
time in backward, so the step's peak per token is
    L_plain * block + L_ckpt * 4C + final + max(12 V x chunk share, block if L_ckpt else 0)
where chunked loss (`loss_chunk_tokens` = K) holds the 12 V buffers for K tokens at a time
instead of N (plus 6C per token for the hidden states' gradient assembled from the slices).
The fused loss kernel (`loss_kernel = "fused"`, engine/fused_loss.py) instead holds, while its
forward runs, one chunk's logits and their gradient in the compute dtype (2 a V per chunk
token), the hidden states and their gradient in the compute dtype (2 a C per token), and the
lm_head weight's cast and fp32 gradient (a V C + 4 V C), in place of the 12 V per token.

These formulas match the peak of live tensors that torch.profiler reports for a forward and
backward to within 0.1% (2.6% with chunked loss) for fp32 and bf16, with and without
checkpointing. Resident memory on CPU is more: the allocator keeps freed and fragmented blocks.
So measured peaks are fitted as `overhead + scale x growing bytes` (probe.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bigbatch.optim.registry import optimizer_entry

AUTOCAST_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOGITS_BUFFERS = 3  # fp32 tokens x vocab buffers alive at once: see the module docstring
CHUNK_GRAD_BYTES = 6  # per token per d_model, chunked loss only: see activation_bytes
# Default calibration, replaced by the probe's fit: the resident memory of a process that has
# imported torch and bigbatch (~230 MB on the CPUs measured), and nothing beyond the live tensors on
# CUDA (the context is not counted by max_memory_allocated).
DEFAULT_OVERHEAD = {"cpu": 240 * 2**20, "cuda": 16 * 2**20}


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int
    seq_len: int
    n_layer: int
    d_model: int
    n_head: int
    attention: str = "sdpa"  # the kernel the model runs (model.ATTENTION_KERNELS)
    # Parameters the optimizer updates: None = all of them; with adapters (model.adapter) the
    # adapters' and a head's, counted on the real adapted model (planner.py).
    trainable_parameters: int | None = None

    @property
    def num_trainable(self) -> int:
        return self.num_parameters if self.trainable_parameters is None \
            else self.trainable_parameters

    @property
    def block_parameters(self) -> int:
        c = self.d_model
        # ln_1, ln_2: 2C each; qkv 3C^2 + 3C; proj C^2 + C; fc 4C^2 + 4C; proj 4C^2 + C
        return 12 * c * c + 13 * c

    @property
    def num_parameters(self) -> int:
        c = self.d_model
        embeddings = (self.vocab_size + self.seq_len) * c  # lm_head is tied to the token table
        return embeddings + self.n_layer * self.block_parameters + 2 * c

    @property
    def linear_parameters(self) -> int:
        """Parameters that go through F.linear, and so get an autocast copy (lm_head = wte)."""
        c = self.d_model
        return self.n_layer * (12 * c * c + 9 * c) + self.vocab_size * c


@dataclass(frozen=True)
class Setup:
    """Everything besides the model that decides a rank's memory."""

    micro_batch_size: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    checkpointing: str = "none"   # none | all | every_n
    checkpoint_every: int = 1
    loss_chunk_tokens: int = 0    # 0 = the whole micro-batch at once
    loss_kernel: str = "standard"  # or "fused" (engine/fused_loss.py)
    world_size: int = 1
    strategy: str = "ddp"
    data_bytes: int = 0
    num_micro_steps: int = 1      # per rank and optimizer step (FSDP's gradients depend on it)
    gradient_sync: str = "last"   # FSDP: reduce-scatter on the last micro-step, or on "every"
    # fp32 elements of optimizer state, counted per trainable parameter on the model by the
    # registry (planner.py); None: the optimizer's state tensors (the same for every
    # parameter) x P_t.
    optimizer_state_elements: int | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1


@dataclass(frozen=True)
class Calibration:
    """The two constants the probe fits: fixed overhead, and a scale on per-token bytes."""

    overhead_bytes: int
    activation_scale: float = 1.0
    source: str = "default"  # "default" or "fit of N probes"


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer_state: int
    autocast_copies: int
    ddp_buckets: int
    data: int
    activations: int
    logits_and_loss: int
    overhead: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def components(self) -> dict[str, int]:
        return asdict(self)


def block_bytes_per_token(dims: ModelDims, precision: str) -> int:
    c, a = dims.d_model, AUTOCAST_BYTES[precision]
    # SDPA keeps a log-sum-exp per head; the explicit kernel keeps each head's row of softmax
    # probabilities instead (q, k, v are saved either way: as views, or as matmul's copies).
    attention = dims.n_head * dims.seq_len * a if dims.attention == "explicit" else 4 * dims.n_head
    return 2 * 4 * c + 16 + attention + 14 * c * a


def final_bytes_per_token(dims: ModelDims, precision: str) -> int:
    c, a = dims.d_model, AUTOCAST_BYTES[precision]
    return 4 * c + 8 + c * a + 16


def num_checkpointed_blocks(n_layer: int, mode: str, every: int) -> int:
    if mode == "all":
        return n_layer
    if mode == "every_n":
        return math.ceil(n_layer / every)  # blocks 0, every, 2*every, ...
    return 0


def activation_bytes(dims: ModelDims, setup: Setup) -> int:
    """Saved activations at the peak, without the logits: blocks, recompute room, final norm."""
    tokens = setup.micro_batch_size * dims.seq_len
    block = block_bytes_per_token(dims, setup.precision)
    ckpt = num_checkpointed_blocks(dims.n_layer, setup.checkpointing, setup.checkpoint_every)
    saved = (dims.n_layer - ckpt) * block + ckpt * 4 * dims.d_model
    saved += final_bytes_per_token(dims, setup.precision)
    if setup.loss_chunk_tokens > 0 and setup.loss_kernel != "fused":
        # The hidden states' gradient assembled from the slices' gradients (an N x C fp32 sum
        # and a slice scattered into a full-size zero tensor), alive through the blocks'
        # backward: 6C per token as the profiler measures it.
        saved += CHUNK_GRAD_BYTES * dims.d_model
    return tokens * saved


def logits_bytes(dims: ModelDims, setup: Setup) -> int:
    tokens = setup.micro_batch_size * dims.seq_len
    if setup.loss_kernel == "fused":
        from bigbatch.engine.fused_loss import DEFAULT_FUSED_CHUNK

        a = AUTOCAST_BYTES[setup.precision]
        chunk = min(tokens, setup.loss_chunk_tokens or DEFAULT_FUSED_CHUNK)
        return (2 * a * dims.vocab_size * chunk + 2 * a * dims.d_model * tokens
                + (a + 4) * dims.vocab_size * dims.d_model)
    if setup.loss_chunk_tokens > 0:
        tokens = min(tokens, setup.loss_chunk_tokens)
    return LOGITS_BUFFERS * 4 * dims.vocab_size * tokens


def recompute_bytes(dims: ModelDims, setup: Setup) -> int:
    """One checkpointed block's activations, rebuilt in backward (after the logits are freed)."""
    if num_checkpointed_blocks(dims.n_layer, setup.checkpointing, setup.checkpoint_every) == 0:
        return 0
    return setup.micro_batch_size * dims.seq_len * block_bytes_per_token(dims, setup.precision)


def fsdp_gathered_bytes(dims: ModelDims, setup: Setup) -> tuple[int, int]:
    """(unsharded parameters, unsharded gradients) an FSDP rank holds at the step's peak."""
    p, block = dims.num_parameters, dims.block_parameters
    root = p - dims.n_layer * block
    g = 2 if setup.precision == "bf16" else 4
    parameters = g * (root + min(2, dims.n_layer) * block)
    trainable = dims.num_trainable / p  # frozen parameters get no gradient
    if setup.gradient_sync == "last" and setup.num_micro_steps > 1:
        return parameters, 4 * dims.num_trainable
    in_flight = g * root + (g + 4 if g == 2 else 4) * block
    return parameters, 4 * dims.num_trainable // setup.world_size + round(trainable * in_flight)


def optimizer_state_bytes(dims: ModelDims, setup: Setup) -> int:
    """The optimizer's fp32 state on one unsharded rank: per parameter, the state tensors its
    entry in the registry (optim/registry.py) keeps for it."""
    if setup.optimizer_state_elements is not None:
        return 4 * setup.optimizer_state_elements
    tensors = optimizer_entry(setup.optimizer).uniform_state_tensors
    if tensors is None:
        raise ValueError(f"optimizer {setup.optimizer!r} keeps different state for different "
                         "parameters: count it on the model (Setup.optimizer_state_elements)")
    return tensors * 4 * dims.num_trainable


def estimate_memory(dims: ModelDims, setup: Setup, calibration: Calibration) -> MemoryEstimate:
    p, trainable = dims.num_parameters, dims.num_trainable
    shards = setup.world_size if setup.sharded else 1
    gathered, gradients = fsdp_gathered_bytes(dims, setup) if setup.sharded else (0, 4 * trainable)
    # Frozen Linear weights are cast too: autocast copies every weight the forward uses.
    autocast = 2 * dims.linear_parameters if AUTOCAST_BYTES[setup.precision] == 2 else 0
    if setup.sharded and setup.precision == "bf16":
        autocast = 0  # FSDP computes with bf16 weights: autocast has nothing to copy
    buckets = 4 * trainable if setup.strategy == "ddp" and setup.world_size > 1 else 0
    scale = calibration.activation_scale
    # Logits buffers and a recomputed block never coexist: backward frees the first before
    # it reaches the blocks (see the module docstring).
    transient = max(logits_bytes(dims, setup), recompute_bytes(dims, setup))
    logits_share = transient if transient == logits_bytes(dims, setup) else 0
    return MemoryEstimate(
        parameters=4 * p // shards + gathered,
        gradients=gradients,
        optimizer_state=optimizer_state_bytes(dims, setup) // shards,
        autocast_copies=autocast,
        ddp_buckets=buckets,
        data=setup.data_bytes,
        activations=round(scale * (activation_bytes(dims, setup) + transient - logits_share)),
        logits_and_loss=round(scale * logits_share),
        overhead=calibration.overhead_bytes,
    )


def growing_bytes(dims: ModelDims, setup: Setup) -> int:
    """The part of the estimate that grows with the micro-batch, before scaling."""
    return activation_bytes(dims, setup) + max(logits_bytes(dims, setup),
                                               recompute_bytes(dims, setup))


def static_bytes(dims: ModelDims, setup: Setup) -> int:
    """The part that does not grow with the micro-batch, without the fixed overhead."""
    estimate = estimate_memory(dims, setup, Calibration(overhead_bytes=0, activation_scale=0.0))
    return estimate.total


def allreduce_bytes_per_step(dims: ModelDims, world_size: int, strategy: str,
                             num_micro_steps: int = 1, precision: str = "fp32",
                             gradient_sync: str = "last") -> int:
    """Bytes each rank sends per optimizer step (ring algorithms: (N-1)/N of the tensor).

    DDP: one all-reduce of the fp32 gradients (no_sync skips the others): 2 (N-1)/N x 4P.
    FSDP: the parameters all-gathered in forward and again in backward on every micro-step,
    2 k x (N-1)/N x g P (g = 2 under bf16, else 4), plus the fp32 gradients reduce-scattered,
    (N-1)/N x 4P once per step (sync "last") or on every micro-step (sync "every").
    """
    if world_size <= 1:
        return 0
    share = (world_size - 1) / world_size
    params, grads = share * dims.num_parameters, share * dims.num_trainable
    if strategy == "ddp":
        return round(2 * grads * 4)
    g = 2 if precision == "bf16" else 4
    reduces = num_micro_steps if gradient_sync == "every" else 1
    return round(params * 2 * num_micro_steps * g + grads * 4 * reduces)
