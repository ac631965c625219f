"""Scoring a loaded model on labelled images: the one evaluator of the promotion gate, export parity and
`compress report` (overall scores, per-class recall drops); and its latency, for `compress report` and `tune`.
Every image goes through the model's own preprocessing (as served), in batches."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

METRICS = ("test/acc", "test/top5", "test/f1", "test/loss")


def latency_ms(predict, image_size: int, batch: int, runs: int) -> float:
    """Median milliseconds of `predict` on a batch of random uint8 images, after three warm-up calls."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, image_size, image_size), dtype=np.uint8)
    for _ in range(3):
        predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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


Z = 1.645  # one-sided 95%: how many standard errors of a class's recall drop are put down to chance


def class_drops(reference: np.ndarray, other: np.ndarray, labels, classes: list[str], max_drop: float) -> list[dict]:
    """The classes whose recall fell from `reference`'s logits to `other`'s (on the same images) by more than
    max_drop beyond chance: drop - Z x se > max_drop, with se = sqrt(b + c + 1) / n, the paired standard error of
    the drop (b, c: the class's images only one of the two gets right, n its images; the +1 keeps one image
    on a tiny class from counting as certain). Each as {class, images, reference, other, drop}."""
    labels = np.asarray(labels)
    ours, theirs = np.asarray(reference).argmax(1) == labels, np.asarray(other).argmax(1) == labels
    found = []
    for index, name in enumerate(classes):
        mine = labels == index
        n = int(mine.sum())
        if not n:
            continue
        a, b = ours[mine], theirs[mine]
        drop = float(a.mean() - b.mean())
        se = np.sqrt((a & ~b).sum() + (~a & b).sum() + 1) / n
        if drop - Z * se > max_drop:
            found.append(
                {"class": name, "images": n, "reference": float(a.mean()), "other": float(b.mean()), "drop": drop}
            )
    return found


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Two models' logits on the same images: max |difference| and how often their top-1 answers agree."""
    if not len(reference):
        return {"max_abs_diff": 0.0, "top1_agreement": 1.0}
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "top1_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
    }
