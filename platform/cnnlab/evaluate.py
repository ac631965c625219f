"""Scoring a loaded model on labelled images: the one evaluator of the promotion gate, export parity and
`compress report`. Every image goes through the model's own preprocessing (as served), in batches."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

METRICS = ("test/acc", "test/top5", "test/f1", "test/loss")


def logits(network, samples, batch: int = 256) -> np.ndarray:
    """The network's logits for every image of a split (`samples`), in order."""
    images = [samples.raw(i, network.image_size) for i in range(len(samples))]
    return network.logits(images, batch)


def scores(logits: np.ndarray, labels, num_classes: int) -> dict[str, float]:
    """Top-1, top-5, macro-F1 and loss of logits against labels."""
    logits, labels = torch.from_numpy(np.asarray(logits, np.float32)), torch.as_tensor(labels)
    return {
        "test/acc": float(multiclass_accuracy(logits, labels, num_classes, average="micro")),
        "test/top5": float(
            multiclass_accuracy(logits, labels, num_classes, average="micro", top_k=min(5, num_classes))
        ),
        "test/f1": float(multiclass_f1_score(logits, labels, num_classes, average="macro")),
        "test/loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def evaluate(network, samples, batch: int = 256) -> dict[str, float]:
    """`scores` of a loaded model on a labelled split."""
    return scores(logits(network, samples, batch), samples.labels, len(network.classes))


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Two models' logits on the same images: max |difference| and how often their top-1 answers agree."""
    if not len(reference):
        return {"max_abs_diff": 0.0, "top1_agreement": 1.0}
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "top1_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
    }
