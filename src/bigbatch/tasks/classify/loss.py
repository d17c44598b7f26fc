"""Sequence classification: the loss and the evaluation (window logits -> one prediction per
text, accuracy, macro-F1) of `train.task = "classify"`.

The gradient arithmetic is train_step's, unchanged: the loss sum here is the weight-weighted sum
of per-window cross-entropies and a batch's `num_targets()` is its weight sum, so the step's loss
is the exact mean over its texts whatever the micro-batches hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.engine.precision import Precision
from bigbatch.errors import UsageError
from bigbatch.parallel.process_group import DistInfo, all_reduce_sum
from bigbatch.tasks.classify.batch import ClassificationBatch


def classifier_logits(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    return model(**batch.model_inputs()).logits


def classification_loss_sum(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    """Sum over windows of weight x cross-entropy (softmax in fp32 or wider)."""
    logits = classifier_logits(model, batch)
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(logits.to(softmax_dtype), batch.labels, reduction="none")
    return (losses * batch.weights.to(losses.dtype)).sum()


def aggregate_window_logits(logits: torch.Tensor, doc_ids: torch.Tensor, num_docs: int,
                            how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text logits (num_docs, classes) from per-window ones: the mean or the element-wise max
    of the text's windows. Also a mask of the texts that had a window here; the other rows are 0
    (so summing the result over ranks that hold disjoint texts gives every text's row)."""
    logits = logits.double()
    keep = doc_ids >= 0  # filler windows belong to no text
    logits, doc_ids = logits[keep], doc_ids[keep]
    counts = torch.zeros(num_docs, dtype=torch.float64, device=logits.device)
    counts.index_add_(0, doc_ids, torch.ones_like(doc_ids, dtype=torch.float64))
    present = counts > 0
    index = doc_ids[:, None].expand_as(logits)
    out = torch.zeros(num_docs, logits.shape[1], dtype=torch.float64, device=logits.device)
    if how == "mean":
        out.index_add_(0, doc_ids, logits)
        out[present] /= counts[present, None]
    elif how == "max":
        out.fill_(-torch.inf)
        out.scatter_reduce_(0, index, logits, reduce="amax")
        out[~present] = 0.0
    else:
        raise UsageError(f"data.aggregate = {how!r} is invalid: mean or max")
    return out, present


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor,
                     num_labels: int) -> torch.Tensor:
    """(true, predicted) counts."""
    flat = labels * num_labels + predictions
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def accuracy_and_macro_f1(confusion: torch.Tensor) -> tuple[float, float]:
    """Accuracy, and the mean over classes of F1 = 2TP / (2TP + FP + FN); a class that neither
    occurs nor is predicted has no F1 and is left out of the mean (as in the usual definition)."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    occurs_or_predicted = confusion.sum(0) + confusion.sum(1)
    f1 = 2 * true_pos / occurs_or_predicted.clamp(min=1)
    seen = occurs_or_predicted > 0
    return (float(true_pos.sum() / confusion.sum().clamp(min=1)),
            float(f1[seen].mean()) if bool(seen.any()) else 0.0)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Sequence[ClassificationBatch], *,
                        doc_labels: torch.Tensor, num_labels: int, aggregate: str,
                        precision: Precision, dist: DistInfo, device: torch.device
                        ) -> dict[str, float]:
    """val_loss (the training loss: per-text mean of window-weighted cross-entropy), and the
    accuracy and macro-F1 of one prediction per text from its aggregated window logits."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, weight sum]
    window_logits, window_docs = [], []
    for batch in batches:
        batch = batch.to(device)
        with precision.autocast():
            logits = classifier_logits(model, batch)
        losses = F.cross_entropy(logits.double(), batch.labels, reduction="none")
        totals[0] += (losses * batch.weights).sum()
        totals[1] += batch.weights.sum()
        window_logits.append(logits.double())
        window_docs.append(batch.doc_ids)
    model.train()
    # A text's windows may span batches but never ranks: aggregate this rank's windows at once;
    # the rows of texts on other ranks are 0, so a sum over ranks gives every text's row.
    doc_logits, _ = aggregate_window_logits(torch.cat(window_logits), torch.cat(window_docs),
                                            len(doc_labels), aggregate)
    all_reduce_sum(totals, dist)
    all_reduce_sum(doc_logits, dist)
    confusion = confusion_matrix(doc_labels.to(device), doc_logits.argmax(dim=1), num_labels)
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion)
    # host sync: evaluation is a logging point
    return {"val_loss": float(totals[0] / totals[1].clamp(min=1)), "val_accuracy": accuracy,
            "val_macro_f1": macro_f1}
