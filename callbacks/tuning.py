"""The Optuna side of a `cnnlab tune` trial, which runs as its own `cnnlab fit` process."""

from __future__ import annotations

import math

import optuna
from optuna_integration import PyTorchLightningPruningCallback
from optuna_integration.pytorch_lightning.pytorch_lightning import _INTERMEDIATE_VALUE


class OptunaPruning(PyTorchLightningPruningCallback):
    """optuna_integration's pruning callback, built from the study's storage and the trial's id.

    It reports `monitor` after every validation; when the pruner says so it stops the fit cleanly and
    records that in the trial (its distributed mode, used for one process too), so the tuner reads the
    outcome from storage. Under DDP only rank 0 reports and every rank stops together. A non-finite
    training loss ends the trial as failed.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_id: int,
        monitor: str = "val/acc",
        pruner: str = "median",
        max_epochs: int = 10,
    ) -> None:
        from cnnlab.tune import make_pruner, open_storage

        study = optuna.load_study(
            study_name=study_name, storage=open_storage(storage), pruner=make_pruner(pruner, max_epochs)
        )
        super().__init__(optuna.trial.Trial(study, trial_id), monitor)

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.is_ddp_backend:
            self.is_ddp_backend = True
            self._trial.storage.set_trial_system_attr(self._trial._trial_id, _INTERMEDIATE_VALUE, {})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"train/loss is {float(loss)} at step {trainer.global_step}: the trial diverged "
                "(lower the learning rate range of the space?)"
            )
