"""LR schedules for `model.lr_scheduler` that span the whole fit: torch schedulers whose length, `total_steps`,
the module fills in from the trainer (after any `model.warmup_epochs`).

Any other torch or timm scheduler works by class_path too, stepped every optimizer step or, with
`model.lr_interval: epoch`, every epoch: `torch.optim.lr_scheduler.MultiStepLR` ({milestones: [30, 60]}),
`StepLR` ({step_size: 2, gamma: 0.94}, the Inception papers' decay), `ReduceLROnPlateau` (on
`model.lr_monitor`), or torch's own `OneCycleLR` (whose `total_steps` is filled in the same way).
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR


class Cosine(LRScheduler):
    """Cosine decay from the optimizer's LR to `min_lr_ratio` of it over `total_steps` (closed form, so a resumed
    fit lands on the same LR)."""

    def __init__(self, optimizer, total_steps: int | None = None, min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if not 0 <= min_lr_ratio < 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {min_lr_ratio}")
        self.total_steps, self.min_lr_ratio = max(1, total_steps or 1), min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        progress = min(self.last_epoch / self.total_steps, 1.0)
        factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return [base * factor for base in self.base_lrs]


class OneCycle(OneCycleLR):
    """torch's one-cycle policy over the whole fit, peaking at the optimizer's LR (each parameter group's own)
    unless `max_lr` is given; momentum is left to the optimizer."""

    def __init__(
        self,
        optimizer,
        total_steps: int | None = None,
        max_lr: float | None = None,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ):
        if not 0 < pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        if max_lr is not None and max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        steps = total_steps or 1
        if steps < 4:  # torch divides by each phase's length minus one: the first steps of a 4-step cycle
            rank_zero_warn(
                f"cnnlab.schedules.OneCycle: {steps} optimizer steps are too few for a cycle; the LR follows the "
                "first steps of a 4-step one. Train longer for a real cycle."
            )
            steps = 4
        super().__init__(
            optimizer,
            max_lr=max_lr or [group["lr"] for group in optimizer.param_groups],
            total_steps=steps,
            pct_start=min(max(pct_start, 2 / steps), 1 - 2 / steps),  # each phase two steps or more
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
            cycle_momentum=False,
            last_epoch=last_epoch,
        )
