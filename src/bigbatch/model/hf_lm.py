"""Hugging Face causal language models under `train.task = "lm"` (model.source = hf:/hf-config:).

The corpus is tokenized with the model's own tokenizer (its directory becomes `data.tokenizer`),
the loss is the same `lm_loss_sum` (it reads `.logits` from a Hugging Face output), and the
finished model is saved in Hugging Face's format in the run directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from bigbatch.config.sections import Config
from bigbatch.errors import UsageError
from bigbatch.model.hf import (
    HFSource,
    apply_hf_checkpointing,
    build_hf_model,
    load_tokenizer,
    parse_source,
    tokenizer_dir,
)


def with_model_tokenizer(cfg: Config) -> tuple[Config, HFSource | None]:
    """`cfg` with data.tokenizer pointing at the Hugging Face model's tokenizer (checked)."""
    source = parse_source(cfg.model.source)
    if source is None:
        return cfg, None
    if cfg.model.loss_chunk_tokens:
        raise UsageError("model.loss_chunk_tokens needs the built-in GPT (model.source = "
                         "\"gpt\"): set it to 0 for a Hugging Face model")
    if cfg.model.loss_kernel == "fused":
        raise UsageError("model.loss_kernel = 'fused' needs the built-in GPT (model.source = "
                         "\"gpt\"): use 'auto' or 'standard' for a Hugging Face model")
    directory = str(tokenizer_dir(source, cfg.data.tokenizer))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=directory)), \
        source


def build_hf_lm(cfg: Config, source: HFSource, vocab_size: int) -> nn.Module:
    """The causal LM, its embeddings grown if bigbatch added the end-of-text token."""
    model = build_hf_model(source, "causal-lm", trust_remote_code=cfg.model.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        if cfg.model.adapter != "none":  # new rows would be random, frozen and never saved
            raise UsageError(f"model.adapter = {cfg.model.adapter!r}: the tokenizer's "
                             f"{vocab_size:,} tokens do not fit the model's embeddings; use a "
                             "model whose vocabulary holds its tokenizer's end-of-text token")
        model.resize_token_embeddings(vocab_size)
    apply_hf_checkpointing(model, cfg.model.activation_checkpointing,
                           cfg.model.checkpoint_every)
    if cfg.data.document_mask:
        require_packed_sequences(model, cfg.model.source)
    return model.train()


def require_packed_sequences(model: nn.Module, source: str) -> None:
    """Document masking through transformers' packed-sequence support: given `position_ids`
    that restart at 0 and no attention mask, its models build a mask that is causal within each
    document (masking_utils.find_packed_sequence_indices), for the eager and sdpa attention on
    CPU as for flash attention. It does so only without a generation cache, which training never
    uses, so the cache is turned off. Checked, not assumed: a tiny packed row of two documents
    must give the second one's logits alone; a model that ignores the positions (or takes none)
    is refused in one line."""
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, 7).remainder(vocab).unsqueeze(0)  # two documents of three tokens
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions).logits[:, 3:]
            alone = model(input_ids=ids[:, 3:]).logits
    except TypeError as err:  # a forward without position_ids
        packed, alone = None, str(err).splitlines()[0]
    finally:
        model.train(training)
    if packed is None or not torch.allclose(packed, alone, rtol=1e-4, atol=1e-4):
        raise UsageError(f"data.document_mask = true: model.source = {source!r} "
                         f"({type(model).__name__}) does not keep packed documents apart by "
                         "their position_ids; set data.document_mask = false, or use a "
                         "transformers model with packed-sequence support (GPT-2, Llama, "
                         "Mistral, Qwen2, ...)")


def save_hf_model(model: nn.Module, cfg: Config, source: HFSource, out_dir: Path,
                  weights: dict[str, torch.Tensor]) -> None:
    model.save_pretrained(str(out_dir), state_dict=weights)
    load_tokenizer(source, cfg.data.tokenizer, cfg.model.trust_remote_code).save_pretrained(
        str(out_dir))
