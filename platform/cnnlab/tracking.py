"""MLflow tracking: one run per fit on the project's store, holding the recipe, its flattened params, the
metrics, the best checkpoint and the test plots; a resumed fit continues its own run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from cnnlab.store import default_tracking_uri

LOGGER = "cnnlab.tracking.MLflowLogger"  # the class path a recipe (and every child fit) names the logger by


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

    def __init__(
        self,
        experiment_name: str = "cnnlab",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        synchronous: bool = False,
    ):
        from cnnlab import __version__

        self.tracking_uri = tracking_uri or default_tracking_uri()  # public: where the run lives
        # Only rank 0 writes to MLflow, but Lightning's logger opens its store in every process: the other ranks
        # get an in-memory one, so that processes started together (torchrun, SLURM) never race to create or
        # migrate the same sqlite file.
        local = self.tracking_uri.startswith("sqlite:") and rank_zero_only.rank != 0
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tags={"cnnlab.version": __version__, **(tags or {})},
            tracking_uri="sqlite:///:memory:" if local else self.tracking_uri,
            run_id=run_id,
            synchronous=synchronous,
        )

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        flat = {k: "None" if v is None else str(v) for k, v in flatten(dict(params)).items()}
        logged = self.experiment.get_run(self.run_id).data.params  # a resumed run keeps what it was started with
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
        if changed:
            rank_zero_warn(
                f"cnnlab: resumed with other values for {', '.join(changed)}; the run keeps its first "
                "values as params (the resumed recipe is in recipe.yaml)."
            )
        flat = {k: v for k, v in flat.items() if k not in logged}
        short = [Param(k, v) for k, v in flat.items() if len(v) <= MAX_PARAM_VAL_LENGTH]
        for start in range(0, len(short), 100):
            self.experiment.log_batch(self.run_id, params=short[start : start + 100])
        for key, value in flat.items():
            if len(value) > MAX_PARAM_VAL_LENGTH:
                self.experiment.log_text(self.run_id, value, f"params/{key}.txt")

    stopped = False  # set when a signal stopped the fit: the run is KILLED (resumable), not FAILED
    logged_through: dict[str, int] = {}  # a resumed run's last logged step per metric, logged before the stop

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if step is not None:  # steps replayed after a resume from the last checkpoint are logged once
            metrics = {k: v for k, v in metrics.items() if step > self.logged_through.get(k, -1)}
        if metrics:
            super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        import mlflow

        mlflow.flush_async_logging()  # the asynchronous metrics first: the run's status comes last
        super().finalize("KILLED" if self.stopped and status == "failed" else status)


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
        for key in ("ckpt_path", "config", "register", "log_model", "test_after_fit"):
            recipe.pop(key, None)
        logger.log_hyperparams(recipe)


class Tracking(Callback):
    """Per-fit bookkeeping on rank 0: system info, the dataset fingerprint and an augmentation preview at
    the start; the count of skipped bad images each epoch; the best checkpoint. (Lightning's
    LearningRateMonitor and ThroughputMonitor log the LRs and images/s.)"""

    def __init__(self) -> None:
        self._epoch_start = 0.0
        self.stopped: int | None = None  # the signal (SIGTERM or SIGINT) that stopped a fit

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """SIGTERM (what schedulers send) or Ctrl-C during a fit: the run ends KILLED (resumable), not FAILED."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit":
            return
        self.stopped = signal.SIGINT if isinstance(exception, KeyboardInterrupt) else signal.SIGTERM
        logger = mlflow_logger(trainer)
        if logger is not None:
            logger.stopped = True  # finalize marks the run KILLED, not FAILED

    def on_fit_start(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        from cnnlab.store import EXPERIMENT_KIND

        client, run_id = logger.experiment, logger.run_id
        client.set_experiment_tag(logger.experiment_id, *EXPERIMENT_KIND)  # the UI's model-training view
        tags = system_info()
        if trainer.checkpoint_callback:
            tags["cnnlab.checkpoint_dir"] = str(Path(trainer.checkpoint_callback.dirpath).resolve())
        datamodule = trainer.datamodule
        if hasattr(datamodule, "describe"):
            data = datamodule.describe()
            tags.update(
                {
                    "cnnlab.data.source": datamodule.source,
                    "cnnlab.data.fingerprint": data["fingerprint"],
                    "cnnlab.data.sizes": json.dumps(data["sizes"]),
                }
            )
            counts = json.dumps(data["class_counts"])
            if len(counts) <= 5000:
                tags["cnnlab.data.class_counts"] = counts
            client.log_dict(run_id, data, "data/fingerprint.json")
            log_dataset(client, run_id, datamodule.source, data)
            with tempfile.TemporaryDirectory() as tmp:
                from cnnlab.data import preview

                client.log_artifact(run_id, str(preview(datamodule, Path(tmp) / "augment_preview.png")), "plots")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_text(run_id, pip_freeze(), "system/requirements.txt")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "hparams", {}).get("on_bad_image") == "skip":
            pl_module.log("data/skipped_images", float(datamodule.skipped), reduce_fx="sum", sync_dist=True)
        if trainer.progress_bar_callback is None and not trainer.sanity_checking:
            # No progress bar (a log file, CI, a batch job): one line per epoch instead of redrawn frames. Every
            # rank reads the metrics (with DDP, a collective: one rank alone would wait for the others forever).
            metrics = trainer.callback_metrics
            if not trainer.is_global_zero:
                return
            shown = {
                k.removesuffix("_epoch"): float(v)
                for k, v in sorted(metrics.items())
                if k.count("/") == 1 and not k.endswith("_step") and v.numel() == 1
            }
            print(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                + f" ({time.perf_counter() - self._epoch_start:.1f} s)",
                flush=True,
            )

    def on_test_end(self, trainer, pl_module) -> None:
        """The test confusion matrix, drawn by torchmetrics, and the reliability diagram, as PNGs on the run, with
        the temperature and the val split's ECE before and after it (rank 0)."""
        logger, matrix = mlflow_logger(trainer), getattr(pl_module, "test_confusion", None)
        if logger is None or matrix is None or not trainer.is_global_zero:
            return
        calibration, client = pl_module.calibration, logger.experiment
        if calibration:
            for key in ("temperature", "ece_before", "ece_after"):
                client.log_metric(logger.run_id, f"calibration/{key}", calibration[key])
        with tempfile.TemporaryDirectory() as tmp:
            from cnnlab.calibration import plot

            tables = pl_module.test_reliability
            plot(tables["ece_uncalibrated"], tables["ece"], pl_module.temperature, Path(tmp) / "reliability.png")
            client.log_artifact(logger.run_id, str(Path(tmp) / "reliability.png"), "plots")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        classes = list(pl_module.classes)
        n = len(classes)
        fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 24), min(2 + 0.5 * n, 24)))
        pl_module.confusion.plot(val=matrix, ax=ax, add_text=n <= 30, labels=classes if n <= 50 else None, cmap="Blues")
        ax.set_title("test confusion matrix")
        fig.tight_layout()
        logger.experiment.log_figure(logger.run_id, fig, "plots/confusion_matrix.png")
        plt.close(fig)
        if pl_module.hparams.get("mistakes") and "test" in getattr(trainer.datamodule, "splits", {}):
            log_mistakes(logger, pl_module, trainer.datamodule, pl_module.hparams.mistakes, trainer.limit_test_batches)

    def on_fit_end(self, trainer, pl_module) -> None:
        logger, checkpoint = mlflow_logger(trainer), trainer.checkpoint_callback
        if logger is None or not trainer.is_global_zero or not checkpoint or not checkpoint.best_model_path:
            return
        logger.experiment.log_artifact(logger.run_id, checkpoint.best_model_path, "checkpoints")
        logger.experiment.set_tag(logger.run_id, "cnnlab.best_checkpoint", Path(checkpoint.best_model_path).name)


class Eager(torch.nn.Module):
    """A ClassifierModule's calibrated logits through its plain network (`net`), never a compiled one."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, images):
        return self.module.net(self.module.normalize(images)) / self.module.temperature


@torch.no_grad()
def log_mistakes(logger: MLFlowLogger, module, datamodule, count: int, limit: int | float = 1.0) -> None:
    """The `count` test images the model got wrong with the highest confidence, each beside its class-activation
    map of the wrong answer, as mistakes/confident_mistakes.png, and the list as mistakes/confident_mistakes.csv
    (rank, index in the test split, its name, true label, predicted label, probability)."""
    from cnnlab.cam import default_layer, maps, overlay, sheet
    from cnnlab.data import limited

    training, wrong = module.training, []
    module.eval()
    seen = 0
    for images, labels in (b for b in limited(datamodule.test_dataloader(), limit) if b is not None):
        probs = module(images.to(module.device)).float().softmax(-1).cpu()
        confidence, predicted = probs.max(1)
        for i in (predicted != labels).nonzero().flatten().tolist():
            wrong.append((float(confidence[i]), seen + i, int(labels[i]), int(predicted[i]), images[i]))
        seen += len(labels)
    wrong = sorted(wrong, key=lambda w: -w[0])[:count]
    classes, split = list(module.classes), datamodule.splits["test"]
    rows = [["rank", "index", "name", "label", "predicted", "probability"]]
    rows += [[r + 1, i, split.name(i), classes[y], classes[p], f"{c:.6f}"] for r, (c, i, y, p, _) in enumerate(wrong)]
    tiles = []
    if wrong:
        batch = torch.stack([w[4] for w in wrong]).to(module.device)
        plain = Eager(module)  # hooks on the plain network, whether or not the fit compiled it
        layer = default_layer(plain, batch.shape[-1])
        heat = maps(plain, layer, batch, [w[3] for w in wrong])
        for (c, _, y, p, image), h in zip(wrong, heat):
            picture = image.permute(1, 2, 0).cpu().numpy()
            tiles.append(
                (np.concatenate([picture, overlay(picture, h)], 1), f"true {classes[y]}\n{classes[p]} {c:.2f}")
            )
    module.train(training)
    with tempfile.TemporaryDirectory() as tmp:
        with open(Path(tmp) / "confident_mistakes.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        if tiles:
            title = f"the {len(tiles)} most confident of {seen} test images' mistakes (left: image, right: its map)"
            sheet(tiles, Path(tmp) / "confident_mistakes.png", title, columns=4)
        logger.experiment.log_artifacts(logger.run_id, tmp, "mistakes")


def log_dataset(client, run_id: str, source: str, data: dict) -> None:
    """The data as an MLflow dataset input of the run (the UI's Datasets panel): its fingerprint as the
    digest, split sizes and class counts as the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    kind = "code" if source in ("digits", "synthetic") else "local"
    dataset = Dataset(
        name=Path(source).name or source,
        digest=data["fingerprint"][:36],
        source_type=kind,
        source=json.dumps({"uri": data["root"] or source}),
        profile=json.dumps({"sizes": data["sizes"], "classes": len(data["class_counts"])}),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])


def system_info() -> dict[str, str]:
    """Versions, hardware and the source commit, as run tags."""
    import platform

    import torch

    from cnnlab import __version__

    info = {
        "cnnlab.version": __version__,
        "sys.python": platform.python_version(),
        "sys.torch": torch.__version__,
        "sys.cuda": torch.version.cuda or "none",
        "sys.host_cpus": str(os.cpu_count()),
        "sys.torch_threads": str(torch.get_num_threads()),
        "sys.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            info["cnnlab.git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def pip_freeze() -> str:
    """What `pip freeze` prints, without a subprocess."""
    from importlib.metadata import distributions

    return (
        "\n".join(
            sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]}, key=str.lower)
        )
        + "\n"
    )


def cpu_twin(program, meta: dict, path: Path, examples: list) -> Path | None:
    """The program as ONNX at `path`, which CPUs run on ONNX Runtime (3-5x faster at batch 1 than the program,
    benchmarks/default_runtime.py); kept only where it gives the program's answers on the sample images (and
    where onnxruntime is installed), else said and left out: the model then runs its program everywhere."""
    from importlib.util import find_spec

    import numpy as np
    import torch

    from cnnlab import cnnlab_model

    if not find_spec("onnxruntime"):
        return None
    size = meta["image_size"]
    try:
        cnnlab_model.write_onnx(program, size, path)
        images = [cnnlab_model.center_crop(cnnlab_model.decode(raw), size, meta["crop_pct"], meta.get("interpolation"))
                  for raw, _ in examples] or [np.full((size, size, 3), 128, np.uint8)]  # fmt: skip
        x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
        with torch.inference_mode():
            ours = program.module()(torch.from_numpy(x)).numpy()
        theirs = cnnlab_model.load_onnx(path, 1, "cpu")[0](x)
    except Exception as err:  # an operator ONNX lacks: the program alone serves
        why = f" ({type(err).__name__}: {str(err)[:200]})"
    else:
        gap = float(np.abs(ours - theirs).max())
        if gap <= 1e-3 * max(1.0, float(np.abs(ours).max())) and (ours.argmax(1) == theirs.argmax(1)).all():
            return path
        why = f": its logits differ from the program's by {gap:.2e}"
    print(f"cnnlab: no ONNX twin for CPUs{why}; the model runs its program")
    path.unlink(missing_ok=True)  # a half-written or unlike twin does not travel in the model's folder
    return None


def log_model(logger: MLFlowLogger, module, datamodule, samples: int = 16) -> str:
    """Log the trained module as a cnnlab model (a torch.export program with everything inference needs, see
    cnnlab_model) on the fit's run; returns its models:/ URI."""
    import torch

    from cnnlab import cnnlab_model, store
    from cnnlab.sources import recorded_data

    split = next(s for s in ("test", "val", "train") if s in datamodule.splits)
    held_out, examples = datamodule.splits[split], []
    for i in range(len(held_out)):  # the first `samples` images that decode (a skipped bad image is no sample)
        try:
            raw = held_out.raw(i, datamodule.image_size)
            cnnlab_model.read_image(raw)
        except Exception:
            continue
        examples.append((raw, held_out.labels[i]))
        if len(examples) == samples:
            break
    compiled, module.compiled = module.compiled, None  # export the plain network, not the compiled one
    from cnnlab.papers import auxiliary_heads

    auxiliary = auxiliary_heads(module.net)  # training only: the model leaves them out, weights and all
    for name in auxiliary:
        setattr(module.net, name, None)
    module.eval().cpu()
    size = datamodule.image_size
    meta = {
        "classes": list(module.classes),
        "image_size": size,
        "crop_pct": datamodule.crop_pct,
        "interpolation": datamodule.interpolation,
        "mean": list(module.hparams.mean),
        "std": list(module.hparams.std),
        "runtime": "torch",
        "format": "torch.export",
        "model": module.hparams.model,
        "data": recorded_data(datamodule),
        "run_id": logger.run_id,
        "temperature": module.temperature,  # already applied: the network's logits are divided by it
        **({"calibration": module.calibration} if module.calibration else {}),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
            folder = Path(tmp) / "network"
            folder.mkdir()
            example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
            program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
            torch.export.save(program, folder / cnnlab_model.NETWORK_FILES["torch"])
            twin = cpu_twin(program, meta, folder / cnnlab_model.CPU_FILE, examples)
            meta = cnnlab_model.write_meta(folder, folder / cnnlab_model.NETWORK_FILES["torch"], meta, examples, twin)
            digest = cnnlab_model.save_model(Path(tmp) / "model", folder, meta)
            return store.log_model(
                logger.experiment,
                logger.run_id,
                Path(tmp) / "model",
                tags={"cnnlab.runtime": "torch", "cnnlab.sha256": digest},
            )
    finally:
        module.compiled = compiled
        for name, head in auxiliary.items():
            setattr(module.net, name, head)


def resumable_run(ckpt_path: str, logger_args, root: str) -> tuple[str, str, str] | None:
    """(run_id, checkpoint file, the run's status) to continue, for a logger's init args (experiment_name,
    run_name, tracking_uri). Checkpoints live in ROOT/EXPERIMENT_ID/RUN_ID/checkpoints/, so a file names its run;
    `last` takes the newest run of this name that left a last.ckpt."""
    from mlflow.exceptions import MlflowException

    from cnnlab import store

    client = store.client(logger_args.tracking_uri)
    if ckpt_path == "last":
        experiment = client.get_experiment_by_name(logger_args.experiment_name)
        if experiment is None:
            return None
        run_name = logger_args.run_name
        name_filter = f"attributes.run_name = '{run_name}'" if run_name else ""
        for run in client.search_runs(
            [experiment.experiment_id], name_filter, order_by=["attributes.start_time DESC"], max_results=50
        ):
            last = Path(root) / experiment.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
            if last.exists():
                return run.info.run_id, str(last), run.info.status
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints":
        return None
    try:
        run = client.get_run(path.parent.parent.name)
    except MlflowException:
        return None
    return run.info.run_id, ckpt_path, run.info.status
