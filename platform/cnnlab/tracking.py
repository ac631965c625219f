"""MLflow tracking: one run per fit on the project's store, holding the recipe, its flattened params, the
metrics, the best checkpoint and the test plots; a resumed fit continues its own run."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from lightning.pytorch import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's sqlite store (its folder made on first use)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        # Absolute, because MLflow caches one store per URI string, whatever the working directory.
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts and lists of dicts to dotted keys: {'trainer.callbacks.0.class_path': ...}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger on cnnlab's store: asynchronous metric logging, and params too long for
    MLflow stored whole as artifacts (`params/KEY.txt`) instead of being cut."""

    def __init__(self, experiment_name: str = "cnnlab", run_name: str | None = None, tracking_uri: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None, synchronous: bool = False):
        from cnnlab import __version__

        super().__init__(experiment_name=experiment_name, run_name=run_name, tags={"cnnlab.version": __version__,
                         **(tags or {})}, tracking_uri=tracking_uri or default_tracking_uri(), run_id=run_id,
                         synchronous=synchronous)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        flat = {k: "None" if v is None else str(v) for k, v in flatten(dict(params)).items()}
        short = [Param(k, v) for k, v in flat.items() if len(v) <= MAX_PARAM_VAL_LENGTH]
        for start in range(0, len(short), 100):
            self.experiment.log_batch(self.run_id, params=short[start:start + 100])
        for key, value in flat.items():
            if len(value) > MAX_PARAM_VAL_LENGTH:
                self.experiment.log_text(self.run_id, value, f"params/{key}.txt")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized:
            import mlflow

            mlflow.flush_async_logging()
        super().finalize(status)


def mlflow_logger(trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class LogRecipe(SaveConfigCallback):
    """Logs the resolved recipe (`recipe.yaml`) and every key of it as a flattened param, on rank 0 of a fit."""

    def __init__(self, parser, config, **kwargs):
        super().__init__(parser, config, save_to_log_dir=False)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or stage != "fit":
            return
        text = self.parser.dump(self.config, skip_none=False)
        logger.experiment.log_text(logger.run_id, text, "recipe.yaml")
        recipe = yaml.safe_load(text)
        for key in ("ckpt_path", "config", "register"):
            recipe.pop(key, None)
        logger.log_hyperparams(recipe)


class Tracking(Callback):
    """Per-fit bookkeeping: the run's checkpoint folder as a tag, the best checkpoint as an artifact, the
    count of skipped bad images as a metric."""

    def on_fit_start(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero and trainer.checkpoint_callback:
            logger.experiment.set_tag(logger.run_id, "cnnlab.checkpoint_dir",
                                      str(Path(trainer.checkpoint_callback.dirpath).resolve()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "hparams", {}).get("on_bad_image") == "skip":
            pl_module.log("data/skipped_images", float(datamodule.skipped), reduce_fx="sum", sync_dist=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        logger, checkpoint = mlflow_logger(trainer), trainer.checkpoint_callback
        if logger is None or not trainer.is_global_zero or not checkpoint or not checkpoint.best_model_path:
            return
        logger.experiment.log_artifact(logger.run_id, checkpoint.best_model_path, "checkpoints")
        logger.experiment.set_tag(logger.run_id, "cnnlab.best_checkpoint", Path(checkpoint.best_model_path).name)


def resumable_run(ckpt_path: str, logger: MLflowLogger, run_name: str | None, root: str) -> tuple[str, str] | None:
    """(run_id, checkpoint file) to continue. Checkpoints live in ROOT/EXPERIMENT_ID/RUN_ID/checkpoints/,
    so a file names its run; `last` takes the newest run of this name that left a last.ckpt."""
    client = logger._mlflow_client
    if ckpt_path == "last":
        experiment = client.get_experiment_by_name(logger._experiment_name)
        if experiment is None:
            return None
        name_filter = f"attributes.run_name = '{run_name}'" if run_name else ""
        for run in client.search_runs([experiment.experiment_id], name_filter, order_by=["attributes.start_time DESC"],
                                      max_results=50):
            last = Path(root) / experiment.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
            if last.exists():
                return run.info.run_id, str(last)
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints":
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(path.parent.parent.name)
    except MlflowException:
        return None
    return path.parent.parent.name, ckpt_path


def log_confusion(trainer, matrix, classes: list[str]) -> None:
    """The test confusion matrix as a PNG on the run (rank 0)."""
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 24), min(2 + 0.5 * n, 24)))
    ax.imshow(matrix.numpy(), cmap="Blues")
    if n <= 50:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 30:
        for (i, j), value in np.ndenumerate(matrix.numpy()):
            ax.text(j, i, int(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    logger.experiment.log_figure(logger.run_id, fig, "plots/confusion_matrix.png")
    plt.close(fig)
