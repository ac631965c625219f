"""The Optuna side of `cnnlab tune`: its storage and pruners, and the callback of a trial, which runs as its own
`cnnlab fit` process."""

from __future__ import annotations

import math
import re

from lightning.pytorch import Callback

from cnnlab import UserError

PRUNED_AT = "pruned_at_epoch"  # the trial's user attribute that tells the tuner the pruner stopped it
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
PRUNERS = ("median", "hyperband", "successive_halving", "none")


def storage_url(url: str | None) -> str:
    """The storage URL, sqlite made absolute: trials open it from other processes."""
    from cnnlab.store import absolute_sqlite

    return absolute_sqlite(url or DEFAULT_STORAGE, "--storage")


def open_storage(url: str | None, heartbeat: float | None = None):
    """Optuna's RDB storage on any SQLAlchemy URL; sqlite waits for locks instead of failing. With `heartbeat`
    (seconds), a running trial beats; one silent for two beats (its study was killed) is failed on resume."""
    import optuna

    url = storage_url(url)
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite") else {}
    if heartbeat:
        kwargs.update(heartbeat_interval=max(1, int(heartbeat)), grace_period=max(2, int(2 * heartbeat)))
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as err:  # a bad URL, a missing driver, an unreachable server, an unwritable file
        raise UserError(
            f"--storage {redact(url)} cannot be opened ({str(err).splitlines()[0][:200]}). Give a "
            "SQLAlchemy URL that this machine can reach and write: sqlite:///path/optuna.db, or "
            "postgresql://user@host/db (with its driver installed)."
        ) from None


def make_pruner(name: str, max_epochs: int = 10):
    import optuna

    if name == "median":  # a few complete trials first, and never on the first epoch alone
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_epochs))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class OptunaPruning(Callback):
    """Reports `monitor` to the study's trial after every validation (`trial.report`) and stops the fit
    when the pruner says so (`trial.should_prune`), recording the epoch as a user attribute; the tuner reads
    the reported values back as the trial's `intermediate_values`. Under DDP rank 0 alone talks to Optuna
    and every rank stops together. A non-finite training loss ends the trial as failed.
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
        self.trial = optuna.trial.Trial(
            study, storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
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
