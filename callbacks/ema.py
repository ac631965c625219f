"""Exponential moving average of the weights, through Lightning's WeightAveraging."""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Keeps an EMA of the weights (and buffers), updated every optimizer step; validation, test and the
    saved checkpoints use the averaged weights.

    With `warmup` (timm's ModelEmaV3 behaviour) the decay of update n is min(decay, (1 + n) / (10 + n)): the
    average follows the weights closely at first, so a short run is not evaluated on near-initial weights.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=self.update)
        self.decay, self.warmup = decay, warmup
        self.updates: int | None = None  # counted here, so the device's counter is read once, not every step

    def update(self, averaged, current, num_averaged) -> None:
        if self.updates is None:
            self.updates = int(num_averaged)  # resumed fits go on counting
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        get_ema_multi_avg_fn(decay)(averaged, current, num_averaged)
        if averaged[0].is_floating_point():  # called once per dtype: count the weights' group only
            self.updates += 1
