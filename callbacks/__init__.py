"""Callbacks for recipes (`class_path: cnnlab.callbacks.NAME`): LR schedules, weight averaging, tuning,
distillation and pruning.

Lightning's own callbacks (EarlyStopping, ModelCheckpoint, ...) are used from recipes as they are.
"""

from cnnlab.callbacks.distillation import Distillation
from cnnlab.callbacks.ema import EMA
from cnnlab.callbacks.pruning import Pruning
from cnnlab.callbacks.schedules import MultiStep, OneCycle, ReduceOnPlateau, WarmupCosine
from cnnlab.callbacks.tuning import OptunaPruning

__all__ = ["EMA", "Distillation", "MultiStep", "OneCycle", "OptunaPruning", "Pruning", "ReduceOnPlateau",
           "WarmupCosine"]
