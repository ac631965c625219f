"""Gradient flow: per-layer gradient norms, to see vanishing gradients (deep plain nets) in MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lightning.pytorch import Callback
from torch import nn


class GradientFlow(Callback):
    """Every `every_n_steps` optimizer steps, the gradient norm of each Conv/Linear weight, input to output.

    Logs `grad_norm/<layer>` per layer, `grad_flow/first_last_ratio` (the first layer's norm over the
    last one's: far below 1 when gradients vanish on their way down), and at the end of the fit a heatmap
    PNG (layer x step, log10 norm) as `plots/gradient_flow.png`.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []
        self.norms: list[list[float]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.layers = [(name, m) for name, m in pl_module.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        norms = [float(m.weight.grad.norm()) if m.weight.grad is not None else 0.0 for _, m in self.layers]
        self.steps.append(trainer.global_step)
        self.norms.append(norms)
        metrics = {f"grad_norm/{name}": value for (name, _), value in zip(self.layers, norms)}
        if norms[-1] > 0:
            metrics["grad_flow/first_last_ratio"] = norms[0] / norms[-1]
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        from cnnlab.tracking import mlflow_logger

        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero or not self.norms:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = heatmap(
                self.norms,
                self.steps,
                [n for n, _ in self.layers],
                Path(tmp) / "gradient_flow.png",
                title=f"{pl_module.hparams.model} (act={pl_module.hparams.act or 'default'})",
            )
            logger.experiment.log_artifact(logger.run_id, str(path), "plots")


def heatmap(norms: list[list[float]], steps: list[int], layers: list[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.log10(np.maximum(np.array(norms).T, 1e-12))  # layers x steps
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(steps) + 3), max(4, 0.22 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ticks = range(0, len(steps), max(1, len(steps) // 10))
    ax.set_xticks(list(ticks), [steps[i] for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (input at the top)")
    ax.set_title(f"log10 gradient norm per layer {title}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
