"""Optuna's storage and pruners, shared by `cnnlab tune` and the callback of each trial (a `cnnlab fit` process of
its own); light to import, so the tuner does not load Lightning to open a study."""

from __future__ import annotations

import re

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
