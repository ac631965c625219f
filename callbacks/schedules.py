"""Learning-rate schedules as callbacks: a torch scheduler stepped after every optimizer step.

Each one restores exactly on resume (closed-form in the step count, state in the checkpoint). The LR
of every step reaches MLflow as `lr` (cnnlab.tracking.Tracking), whichever schedule runs.
"""

from __future__ import annotations

import bisect
import math

import torch
from lightning.pytorch import Callback


class _Schedule(Callback):
    """Builds its torch scheduler at train start and steps it once per optimizer step."""

    def __init__(self) -> None:
        self.scheduler = None
        self._state: dict | None = None
        self._stepped = 0

    def make(self, optimizer, total_steps: int, steps_per_epoch: int):
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        self.total_steps = max(1, int(trainer.estimated_stepping_batches))
        self.scheduler = self.make(optimizer, self.total_steps, steps_per_epoch)
        if self._state is not None:
            self.scheduler.load_state_dict(self._state)
            for group, lr in zip(optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        self._stepped = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        while self._stepped < trainer.global_step:
            self._stepped += 1
            if self._stepped < self.total_steps:
                self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else (self._state or {})

    def load_state_dict(self, state_dict: dict) -> None:
        self._state = state_dict or None


class WarmupCosine(_Schedule):
    """Linear warmup from 0 to the optimizer's LR, then cosine decay to `min_lr_ratio` of it."""

    def __init__(self, warmup_epochs: float = 1.0, min_lr_ratio: float = 0.0) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0 <= min_lr_ratio < 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {min_lr_ratio}")
        super().__init__()
        self.warmup_epochs, self.min_lr_ratio = warmup_epochs, min_lr_ratio

    def make(self, optimizer, total_steps, steps_per_epoch):
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total_steps - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MultiStep(_Schedule):
    """Multiply the LR by `gamma` at each epoch in `milestones` (a single one gives a step schedule)."""

    def __init__(self, milestones: list[int], gamma: float = 0.1) -> None:
        if not milestones or sorted(milestones) != list(milestones) or milestones[0] < 1:
            raise ValueError(f"milestones must be increasing epochs >= 1, got {milestones}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        super().__init__()
        self.milestones, self.gamma = list(milestones), gamma

    def make(self, optimizer, total_steps, steps_per_epoch):
        boundaries = [m * steps_per_epoch for m in self.milestones]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.gamma ** bisect.bisect_right(boundaries, step)
        )


class OneCycle(_Schedule):
    """torch's one-cycle policy over the whole fit; `max_lr` defaults to the optimizer's LR."""

    def __init__(
        self,
        max_lr: float | None = None,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        if not 0 < pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        if max_lr is not None and max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        super().__init__()
        self.max_lr, self.pct_start, self.div_factor = max_lr, pct_start, div_factor
        self.final_div_factor, self.three_phase = final_div_factor, three_phase

    def make(self, optimizer, total_steps, steps_per_epoch):
        if total_steps < 4:  # too short to rise and fall (torch divides by each phase's length): a constant LR
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"cnnlab.callbacks.OneCycle: {total_steps} optimizer steps are too few for a cycle; "
                "the LR stays constant."
            )
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        # A resumed optimizer holds the peak as `max_lr` (its `lr` and `initial_lr` are already the cycle's start).
        max_lr = self.max_lr or [g.get("max_lr", g["lr"]) for g in optimizer.param_groups]
        # Each phase needs two steps or more (torch divides by its length minus one).
        pct_start = min(max(self.pct_start, 2 / total_steps), 1 - 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
            three_phase=self.three_phase,
            cycle_momentum=False,
        )


class ReduceOnPlateau(_Schedule):
    """Cut the LR by `factor` when `monitor` stops improving for `patience` validations."""

    def __init__(
        self, monitor: str = "val/loss", mode: str = "min", factor: float = 0.1, patience: int = 5, min_lr: float = 0.0
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        super().__init__()
        self.monitor, self.mode, self.factor, self.patience, self.min_lr = monitor, mode, factor, patience, min_lr

    def make(self, optimizer, total_steps, steps_per_epoch):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=self.mode, factor=self.factor, patience=self.patience, min_lr=self.min_lr
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass  # stepped by validation, not by optimizer steps

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.scheduler is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"ReduceOnPlateau: metric {self.monitor!r} was not logged. "
                f"Logged: {', '.join(sorted(trainer.callback_metrics))}."
            )
        self.scheduler.step(float(value))
