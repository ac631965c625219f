"""Callbacks for recipes (`class_path: cnnlab.callbacks.NAME`): weight averaging, tuning, fine-tuning,
distillation, pruning and gradient flow. (LR schedules are `model.lr_scheduler`: cnnlab.schedules.)

Lightning's own callbacks (EarlyStopping, ModelCheckpoint, ...) are used from recipes as they are. Each
callback loads on first use, so a recipe that does not tune never imports Optuna.
"""

import importlib

_WHERE = {
    "EMA": "ema",
    "Distillation": "distillation",
    "FreezeBackbone": "finetuning",
    "GradientFlow": "gradient_flow",
    "OptunaPruning": "tuning",
    "Pruning": "pruning",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"cnnlab.callbacks has no {name!r}; it has {', '.join(__all__)}")
    return getattr(importlib.import_module(f"cnnlab.callbacks.{_WHERE[name]}"), name)
