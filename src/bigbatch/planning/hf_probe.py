"""The memory planner with Hugging Face models: the model dimensions its memory model needs, read
from the config, and the model and batches the probe measures (the real model, random inputs).

The planner's memory model is written for the built-in GPT; for a BERT- or GPT-2-like model of the
same layers, width and vocabulary it is a first guess that the probe's measurements then correct
(the calibration fits the overhead and the activation scale to them). Chunked loss does not exist
for these models, so a plan that needs it is refused.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bigbatch.config.sections import Config
from bigbatch.errors import UsageError
from bigbatch.model.hf import apply_hf_checkpointing, build_hf_model, load_config, parse_source
from bigbatch.planning.memory import ModelDims


def hf_dims(cfg: Config, seq_len: int) -> ModelDims:
    source = parse_source(cfg.model.source)
    config = load_config(source, cfg.model.trust_remote_code)
    get = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return ModelDims(vocab_size=get.vocab_size, seq_len=seq_len,
                         n_layer=get.num_hidden_layers, d_model=get.hidden_size,
                         n_head=get.num_attention_heads)
    except AttributeError as err:
        raise UsageError(f"batch.micro_batch_size = \"auto\": the planner cannot read the "
                         f"model's dimensions from its config ({err}): give a micro-batch size"
                         ) from None


def hf_model_from_config(cfg: Config) -> nn.Module:
    """The model class of the task, built from the config alone (random weights; under a meta
    device context, shapes only). A classifier gets two labels, as the probe's has."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classify = cfg.train.task == "classify"
    config = load_config(parse_source(cfg.model.source), cfg.model.trust_remote_code,
                         **({"num_labels": 2} if classify else {}))
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    return auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def planning_config(cfg: Config) -> Config:
    """For classify: plan `global_sequences` windows of `max_length` tokens (every window full:
    the most memory a micro-batch of that many windows can take)."""
    if cfg.train.task != "classify":
        return cfg
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, seq_len=cfg.data.max_length),
        batch=dataclasses.replace(cfg.batch, global_tokens=cfg.batch.global_sequences
                                  * cfg.data.max_length))


def hf_probe_setup(request, device: torch.device):
    """(model, loss_sum_fn, make_batch) for a probe of a Hugging Face model."""
    from bigbatch.batch import MicroBatch
    from bigbatch.data.classification import ClassificationBatch
    from bigbatch.engine.classification import classification_loss_sum
    from bigbatch.engine.step import lm_loss_sum

    if request.loss_chunk_tokens:
        raise UsageError("chunked loss is not available for Hugging Face models")
    source = parse_source(request.model_source)
    task = request.task
    model: nn.Module = build_hf_model(source, task, trust_remote_code=request.trust_remote_code,
                                      labels=["0", "1"] if task == "classify" else None)
    apply_hf_checkpointing(model, request.checkpointing, request.checkpoint_every)
    model.to(device).train()
    vocab = model.get_input_embeddings().num_embeddings
    shape = (request.micro_batch_size, request.dims.seq_len)

    def make_batch():
        ids = torch.randint(0, vocab, shape, device=device)
        if task == "lm":
            return MicroBatch(ids, torch.randint(0, vocab, shape, device=device))
        count = shape[0]
        return ClassificationBatch(ids, torch.ones_like(ids),
                                   torch.randint(0, 2, (count,), device=device),
                                   torch.ones(count, dtype=torch.float64, device=device),
                                   torch.arange(count, device=device))

    return model, classification_loss_sum if task == "classify" else lm_loss_sum, make_batch
