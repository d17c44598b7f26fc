"""The memory planner with Hugging Face models: the model dimensions its memory model needs, read
from the config, and the model and batches the probe measures (the real model, random inputs).

The planner's memory model is written for the built-in GPT; for a BERT- or GPT-2-like model of the
same layers, width and vocabulary it is a first guess that the probe's measurements then correct
(the calibration fits the overhead and the activation scale to them). Chunked loss does not exist
for these models, so a plan that needs it is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.config.sections import Config
from bigbatch.errors import UsageError
from bigbatch.model.hf import (
    apply_hf_checkpointing,
    auto_model_class,
    build_hf_model,
    load_config,
    parse_source,
    text_dims,
)
from bigbatch.planning.memory import ModelDims
from bigbatch.tasks import task_named, task_of


def hf_dims(cfg: Config, seq_len: int) -> ModelDims:
    try:
        dims = text_dims(parse_source(cfg.model.source), cfg.model.trust_remote_code)
    except AttributeError as err:
        raise UsageError(f"batch.micro_batch_size = \"auto\": the planner cannot read the "
                         f"model's dimensions from its config ({err}): give a micro-batch size"
                         ) from None
    return ModelDims(seq_len=seq_len, **dims)


def hf_model_from_config(cfg: Config) -> nn.Module:
    """The model with the task's head, built from the config alone (random weights; under a
    meta device context, shapes only), with the probe's labels (tasks/base.py)."""
    task = task_of(cfg)
    labels = task.probe_labels
    config = load_config(parse_source(cfg.model.source), cfg.model.trust_remote_code,
                         **({"num_labels": len(labels)} if labels else {}))
    return auto_model_class(task.model_head).from_config(
        config, trust_remote_code=cfg.model.trust_remote_code)


def hf_probe_setup(request, device: torch.device):
    """(model, loss_sum_fn, make_batch) for a probe of a Hugging Face model: the task's head,
    loss and random batches (tasks/base.py)."""
    if request.loss_chunk_tokens:
        raise UsageError("chunked loss is not available for Hugging Face models")
    task = task_named(request.task)
    source = parse_source(request.model_source)
    model: nn.Module = build_hf_model(source, task.model_head,
                                      trust_remote_code=request.trust_remote_code,
                                      labels=task.probe_labels)
    apply_hf_checkpointing(model, request.checkpointing, request.checkpoint_every)
    model.to(device).train()
    vocab = model.get_input_embeddings().num_embeddings

    def make_batch():
        return task.probe_batch(vocab, request.micro_batch_size, request.dims.seq_len, device)

    return model, task.probe_loss_sum(), make_batch
