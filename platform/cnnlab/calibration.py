"""Calibrated probabilities: a temperature fitted on the validation split's logits (Guo et al. 2017, "On
Calibration of Modern Neural Networks": one scalar T, logits / T, minimising the negative log-likelihood), the
expected calibration error and its reliability diagram, and the confidence threshold under which a model
answers "unsure".

A fit's model divides its logits by T inside its own network, so every runtime and every consumer (the pyfunc,
`serve`, `predict`, the gate, exports) gives the same calibrated probabilities; cnnlab.json records T and the
validation split's confidence curve (coverage and accuracy per threshold), from which `--target-precision`
picks a threshold without any data.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

BINS = 15  # the reliability diagram's and the ECE's equal-width confidence bins (torchmetrics' default)
THRESHOLDS = [round(i / 100, 2) for i in range(100)]  # the confidence curve's thresholds: 0.00 .. 0.99


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the cross-entropy of logits / T (LBFGS on log T, in float64)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().double().cpu().clone(), labels.detach().long().cpu().clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        return float(log_t.detach().exp().clamp(0.05, 20.0))


class Reliability(Metric):
    """Per confidence bin: images, summed confidence and correct answers (sums, so ranks add up); computes the
    expected calibration error, sum over bins of |accuracy - confidence| x the bin's share of the images."""

    full_state_update = False

    def __init__(self, bins: int = BINS):
        super().__init__()
        self.bins = bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, predicted = logits.detach().float().softmax(-1).max(-1)
        index = (confidence * self.bins).long().clamp(max=self.bins - 1)
        ones = torch.ones_like(confidence, dtype=torch.float64)
        self.count.index_add_(0, index, ones)
        self.confidence.index_add_(0, index, confidence.double())
        self.correct.index_add_(0, index, (predicted == labels).double())

    def compute(self) -> torch.Tensor:
        total = self.count.sum().clamp(min=1)
        gap = (self.correct - self.confidence).abs()  # = count x |accuracy - confidence| per bin
        return (gap.sum() / total).float()

    def table(self) -> list[tuple[float, float, int]]:
        """(mean confidence, accuracy, images) of each non-empty bin, over every rank (a collective under DDP)."""
        with self.sync_context():
            return [
                (float(s / n), float(c / n), int(n)) for s, c, n in zip(self.confidence, self.correct, self.count) if n
            ]


def ece(table: list[tuple[float, float, int]]) -> float:
    """The expected calibration error of a Reliability table."""
    return sum(n * abs(acc - conf) for conf, acc, n in table) / max(1, sum(n for _, _, n in table))


def selective(logits, labels, threshold: float) -> tuple[float, float]:
    """(coverage, accuracy) when answering only where the top probability reaches `threshold`: the share of images
    answered, and the accuracy on those (1.0 when none is). Logits and labels as tensors or arrays."""
    confidence, predicted = torch.as_tensor(logits).float().softmax(-1).max(-1)
    answered, correct = confidence >= threshold, predicted == torch.as_tensor(labels)
    coverage = float(answered.float().mean()) if len(correct) else 0.0
    return coverage, float(correct[answered].float().mean()) if answered.any() else 1.0


def confidence_curve(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """[threshold, coverage, accuracy] (`selective`) at each of THRESHOLDS."""
    return [[t, *(round(v, 6) for v in selective(logits, labels, t))] for t in THRESHOLDS]


def threshold_for(meta: dict, precision: float) -> tuple[float, float, float]:
    """(threshold, coverage, accuracy): the lowest threshold whose answers were right at least `precision` of the
    time on the model's validation split (its recorded confidence curve); ValueError when none is."""
    curve = (meta.get("calibration") or {}).get("curve")
    if not curve:
        raise ValueError("the model records no confidence curve (it was not calibrated): pass --min-confidence")
    for threshold, coverage, accuracy in curve:
        if accuracy >= precision and coverage > 0:
            return threshold, coverage, accuracy
    best = max(curve, key=lambda row: row[2] if row[1] > 0 else -1)
    raise ValueError(
        f"no threshold reaches precision {precision} on the validation split (best {best[2]:.4f} at "
        f"{best[0]}, covering {best[1]:.1%}): ask for less, or pass --min-confidence"
    )


def answer_threshold(
    meta: dict, carried: float = 0.0, min_confidence: float | None = None, target_precision: float | None = None
) -> tuple[float, str]:
    """(threshold, why): the top probability below which a model (its cnnlab.json `meta`) answers unsure:
    --min-confidence, else the lowest threshold reaching --target-precision on its validation split, else what
    its registered version carries (`carried`; 0: always answer)."""
    from cnnlab import UserError

    if min_confidence is not None and target_precision is not None:
        raise UserError("--min-confidence and --target-precision both choose the threshold: give one.")
    for flag, value in (("--min-confidence", min_confidence), ("--target-precision", target_precision)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} {value}: give a probability from 0 to 1.")
    if min_confidence is not None:
        return min_confidence, "--min-confidence"
    if target_precision is None:
        return carried, "the version's min_confidence tag" if carried else ""
    try:
        threshold, coverage, accuracy = threshold_for(meta, target_precision)
    except ValueError as err:
        raise UserError(f"--target-precision {target_precision}: {err}.") from None
    return threshold, (
        f"--target-precision {target_precision} (on its validation split: precision {accuracy:.4f}, "
        f"{coverage:.1%} answered)"
    )


def plot(before: list, after: list, temperature: float, path) -> None:
    """The reliability diagram (accuracy against confidence per bin: Reliability tables before and after the
    temperature) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for rows, name, style in ((before, "uncalibrated", "o-"), (after, f"T = {temperature:.3g}", "s-")):
        ax.plot([r[0] for r in rows], [r[1] for r in rows], style, label=f"{name} (ECE {ece(rows):.4f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy", title="reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
