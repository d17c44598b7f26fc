"""The `[model]` section: which model, its shape, how it is computed, and its adapters."""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.config.fields import option, require

ATTENTION_CHOICES = ("auto", "sdpa", "explicit")  # model.ATTENTION_KERNELS plus auto
LOSS_KERNELS = ("auto", "standard", "fused")
CHECKPOINTING = ("none", "all", "every_n", "auto")
ADAPTERS = ("none", "lora")


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = option(4, "Number of Transformer blocks.")
    d_model: int = option(384, "Width of the residual stream.")
    n_head: int = option(6, "Attention heads; must divide d_model.")
    dropout: float = option(0.0, "Dropout probability (0 keeps training deterministic and fast).")
    activation_checkpointing: str = option(
        "auto", "Recompute block activations in backward instead of keeping them: none | all | "
                "every_n (blocks 0, n, 2n, ...) | auto (with batch.micro_batch_size = \"auto\" "
                "the planner turns on checkpointing, then chunked loss, only if nothing fits "
                "without; otherwise none).")
    checkpoint_every: int = option(2, "every_n checkpointing: checkpoint every this many blocks.")
    loss_chunk_tokens: int = option(0, "Compute the loss over slices of this many tokens so the "
                                       "full tokens x vocab logits never exist; 0 = off.")
    loss_kernel: str = option("auto", "How the built-in GPT computes its loss: standard (the "
                                      "logits, then cross-entropy; checkpointed slices with "
                                      "loss_chunk_tokens) | fused (lm_head and cross-entropy "
                                      "chunk by chunk, gradients in forward, compiled: the "
                                      "logits never exist whole) | auto (fused on a CPU from a "
                                      "32,768-token vocabulary up, where it pays; not on a GPU, "
                                      "where it cost 22% at 50K; not with FSDP).")
    attention: str = option("auto", "Attention kernel: sdpa (scaled_dot_product_attention, "
                                    "flash where the device has it) | explicit (softmax(qk^T)v "
                                    "as plain ops: faster on CPU, keeps T x T probabilities) | "
                                    "auto (explicit on CPU in bf16/fp16, sdpa "
                                    "otherwise).")
    source: str = option("gpt", "gpt (the built-in GPT; n_layer, d_model, n_head apply) | hf:DIR "
                                "(a local Hugging Face model directory; hf:package:NAME/SUB is "
                                "SUB inside the installed Python package NAME) | hf-config:FILE "
                                "(random initialisation from a config.json).")
    trust_remote_code: bool = option(False, "Let a Hugging Face model directory run its own "
                                            "Python code (off: only transformers' own classes).")
    adapter: str = option("none", "none (train every weight) | lora (train low-rank adapters "
                                  "through peft; the base weights stay frozen, a classifier's "
                                  "head is trained whole; pip install 'bigbatch[hf]').")
    lora_rank: int = option(8, "lora: the rank r of each adapter (A is r x in, B is out x r).")
    lora_alpha: float = option(16.0, "lora: the adapter's output is scaled by lora_alpha / "
                                     "lora_rank.")
    lora_dropout: float = option(0.0, "lora: dropout on the adapter's input.")
    lora_targets: tuple[str, ...] = option(
        (), "lora: names (last components) of the Linear/Conv1D modules that get adapters; [] = "
            "the model family's attention and MLP projections (BERT query, key, value, dense; "
            "GPT-2 c_attn, c_proj, c_fc; Llama q/k/v/o/gate/up/down_proj; the built-in GPT qkv, "
            "proj, fc).")

    def __post_init__(self) -> None:
        require(self.activation_checkpointing in CHECKPOINTING, "model.activation_checkpointing",
                self.activation_checkpointing, f"one of {CHECKPOINTING}")
        require(self.attention in ATTENTION_CHOICES, "model.attention", self.attention,
                f"one of {', '.join(ATTENTION_CHOICES)}")
        require(self.loss_kernel in LOSS_KERNELS, "model.loss_kernel", self.loss_kernel,
                f"one of {', '.join(LOSS_KERNELS)}")
        require(self.checkpoint_every >= 1, "model.checkpoint_every", self.checkpoint_every,
                "an integer >= 1")
        require(self.loss_chunk_tokens >= 0, "model.loss_chunk_tokens", self.loss_chunk_tokens,
                "an integer >= 0 (0 = off)")
        require(self.source == "gpt" or self.source.startswith(("hf:", "hf-config:")),
                "model.source", self.source, "gpt, hf:DIR or hf-config:FILE")
        require(self.n_layer >= 1, "model.n_layer", self.n_layer, "an integer >= 1")
        require(self.n_head >= 1, "model.n_head", self.n_head, "an integer >= 1")
        require(self.d_model >= 1 and self.d_model % self.n_head == 0, "model.d_model",
                self.d_model, f"a positive multiple of model.n_head ({self.n_head})")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")
        require(self.adapter in ADAPTERS, "model.adapter", self.adapter, f"one of {ADAPTERS}")
        require(self.lora_rank >= 1, "model.lora_rank", self.lora_rank, "an integer >= 1")
        require(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "a number > 0")
        require(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", self.lora_dropout,
                "a number in [0, 1)")
        # Adapters over random weights would teach nothing, and a checkpoint, which leaves the
        # frozen base out, could not be restored without the same draw: a pretrained hf:DIR.
        require(self.adapter == "none" or not self.source.startswith("hf-config:"),
                "model.adapter", self.adapter, "none with model.source = hf-config: (random "
                "weights); LoRA adapts pretrained weights: model.source = hf:DIR")
        require(all(name.strip() for name in self.lora_targets), "model.lora_targets",
                list(self.lora_targets), "a list of module names, e.g. [\"query\", \"value\"]")
