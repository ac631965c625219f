"""Callbacks for recipes (`class_path: cnnlab.callbacks.NAME`): LR schedules and weight averaging.

Lightning's own callbacks (EarlyStopping, ModelCheckpoint, ...) are used from recipes as they are.
"""

from cnnlab.callbacks.ema import EMA
from cnnlab.callbacks.schedules import MultiStep, OneCycle, ReduceOnPlateau, WarmupCosine

__all__ = ["EMA", "MultiStep", "OneCycle", "ReduceOnPlateau", "WarmupCosine"]
