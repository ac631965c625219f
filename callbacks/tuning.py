"""The Optuna side of a `cnnlab tune` trial, which runs as its own `cnnlab fit` process."""

from __future__ import annotations

import math

from lightning.pytorch import Callback

from cnnlab.studies import PRUNED_AT, make_pruner, open_storage


class OptunaPruning(Callback):
    """Reports `monitor` to the study's trial after every validation (`trial.report`) and stops the fit
    when the pruner says so (`trial.should_prune`), recording the epoch as a user attribute; the tuner reads
    the reported values back as the trial's `intermediate_values`. Under DDP rank 0 alone talks to Optuna
    and every rank stops together. A non-finite training loss ends the trial as failed. In a study of two
    objectives Optuna neither takes reports nor prunes: the values are kept in the storage all the same.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "val/acc",
        pruner: str = "median",
        max_epochs: int = 10,
    ) -> None:
        if trial_number < 0:
            raise ValueError(f"trial_number must be >= 0, got {trial_number}")
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.monitor, self.pruner, self.max_epochs = monitor, pruner, max_epochs
        self.trial = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.trial is not None:
            return
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, pruner=make_pruner(self.pruner, self.max_epochs)
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
        self.trial, self.store = optuna.trial.Trial(study, self.trial_id), storage

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and len(self.trial.study.directions) > 1:
                self.store.set_trial_intermediate_value(self.trial_id, trainer.current_epoch, float(value))
            elif value is not None:
                self.trial.report(float(value), step=trainer.current_epoch)
                stop = self.trial.should_prune()
                if stop:
                    self.trial.set_user_attr(PRUNED_AT, trainer.current_epoch)
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"train/loss is {float(loss)} at step {trainer.global_step}: the trial diverged "
                "(lower the learning rate range of the space?)"
            )
