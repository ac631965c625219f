"""`cnnlab fit|validate|test|predict`: a recipe run through LightningCLI, tracked in MLflow."""

from __future__ import annotations

import csv
import importlib
import inspect
import re
import signal
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from cnnlab import UserError, did_you_mean
from cnnlab.callbacks.checkpoints import LastCheckpoint
from cnnlab.data import DEFAULT_IMAGE_SIZE, DataModule
from cnnlab.module import ClassifierModule
from cnnlab.pretrained import follow_weights
from cnnlab.tracking import LOGGER, LogRecipe, Tracking, log_model, mlflow_logger, resumable_run

warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # cnnlab's own argv is not the recipe's


def trainer_defaults() -> dict:
    """Defaults a recipe may override: MLflow tracking, and the GPU fast path when there is a GPU."""
    cuda = torch.cuda.is_available()
    return {
        "logger": {"class_path": LOGGER},
        "default_root_dir": "mlruns",
        "log_every_n_steps": 10,
        "precision": "bf16-mixed" if cuda else "32-true",
        "benchmark": cuda,
        "enable_progress_bar": sys.stderr.isatty(),  # elsewhere Tracking prints one line per epoch
        "callbacks": [Tracking()],
        "plugins": [{"class_path": "cnnlab.callbacks.checkpoints.AtomicCheckpointIO"}],
    }


class CnnlabCLI(LightningCLI):
    """LightningCLI with the data linked into the model, a best-and-last checkpoint, one MLflow run per
    fit (resumed with --ckpt_path), and a test of the best checkpoint after every fit."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        # errors come back to us, to be explained in one paragraph; a key is never matched by its prefix
        quiet = {"exit_on_error": False, "allow_abbrev": False}
        super().__init__(
            ClassifierModule,
            DataModule,
            save_config_callback=LogRecipe,
            trainer_defaults=trainer_defaults(),
            auto_configure_optimizers=False,
            args=args,
            run=run,
            parser_kwargs={**quiet, **{name: quiet for name in self.subcommands()}},
            **kwargs,
        )

    def parse_arguments(self, parser, args) -> None:
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise UserError(explain_recipe_error(str(err), self.recipe_keys())) from None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in ("last", "best", "hpc"):
            from cnnlab.store import read_checkpoint

            # as data only, before Lightning reads its hyperparameters; its classes are checked against the data's
            saved = read_checkpoint(ckpt_path, "--ckpt_path").get("hyper_parameters") or {}
            self.checkpoint_classes = saved.get("classes") or [str(i) for i in range(saved.get("num_classes", 0))]

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.save_last:  # Lightning's own last.ckpt skips epochs with no best
            checkpoint.save_last = False
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer.callbacks.append(LastCheckpoint(config.get("last_every_n_steps")))
        if trainer.loggers:  # the LR of each parameter group and images/s (both refuse a trainer without a logger)
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
            trainer.callbacks.append(ThroughputMonitor(batch_size_fn=batch_size, window_size=10))
        return trainer

    def recipe_keys(self) -> list[str]:
        """Every dotted key a recipe may set, from a parser built the way LightningCLI builds its own."""
        parser = self.init_parser(exit_on_error=False)
        self.add_core_arguments_to_parser(parser)
        self.add_arguments_to_parser(parser)
        return [*parser.get_defaults().keys(), "ckpt_path", "config"]

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("model.tta", "data.tta")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--last_every_n_steps",
            type=int | None,
            default=None,
            metavar="N",
            help="besides every epoch, write last.ckpt every N optimizer steps (with checkpoint.save_last)",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after `fit`, test the best checkpoint on the test split (same MLflow run)",
        )
        parser.add_argument(
            "--log_model",
            type=bool,
            default=True,
            help="after `fit`, log the best weights as a cnnlab model (a torch.export program in a self-contained pyfunc)",
        )
        parser.add_argument(
            "--register",
            type=str | None,
            default=None,
            metavar="NAME",
            help="after `fit`, register the logged model as a new version of NAME (alias challenger)",
        )

    checkpoint_classes: list[str] | None = None  # the classes the --ckpt_path checkpoint was trained on
    resumed: str | None = None  # the MLflow run a fit continues (or a test logs into)
    status: str | None = None  # that run's status when this command began

    def before_instantiate_classes(self) -> None:
        """Name the run after the recipe; with --ckpt_path, continue the MLflow run that wrote the checkpoint."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        follow_weights(config)
        config.model.image_size = config.data.image_size = config.data.image_size or DEFAULT_IMAGE_SIZE
        logger = config.trainer.logger
        if getattr(logger, "class_path", None) != LOGGER:
            return
        if logger.init_args.run_name is None and config.get("config"):
            logger.init_args.run_name = Path(str(config.config[-1])).stem
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or logger.init_args.run_id:
            return
        found = resumable_run(str(ckpt_path), logger.init_args, config.trainer.default_root_dir)
        if found and self.subcommand == "fit" and found[2] == "FINISHED":
            print(
                f"cnnlab: run {found[0]} already FINISHED (its test and model are logged); nothing to resume. "
                "Run the command without --ckpt_path for a new fit, or fine-tune from it with "
                f"--model.pretrained=runs:/{found[0]}/model.",
                file=sys.stderr,
            )
            raise SystemExit(0)
        if found:
            (self.resumed, config.ckpt_path, self.status), logger.init_args.run_id = found, found[0]
            rank_zero_info(f"cnnlab: continuing MLflow run {found[0]} from {found[1]}")
        elif ckpt_path == "last":
            config.ckpt_path = None
            rank_zero_info(f"cnnlab: no last.ckpt for run '{logger.init_args.run_name}' yet: starting a fresh fit")

    def _resume_run(self) -> None:
        """A checkpoint must know the data's classes; a resumed run shows RUNNING and logs no step twice."""
        ckpt_path, logger = self.config_init[self.subcommand].get("ckpt_path"), mlflow_logger(self.trainer)
        known, data = self.checkpoint_classes, list(self.datamodule.classes)
        if known and list(known) != data:
            raise UserError(
                f"--ckpt_path {ckpt_path} knows {len(known)} classes ({', '.join(map(str, known[:6]))}"
                f"{', ...' if len(known) > 6 else ''}); data.source='{self.datamodule.source}' has "
                f"{len(data)} ({', '.join(data[:6])}{', ...' if len(data) > 6 else ''}). Use data with the "
                "checkpoint's classes, or start a new fit (model.pretrained fine-tunes from it)."
            )
        if self.resumed and logger is not None and self.trainer.is_global_zero:
            logger.experiment.update_run(self.resumed, status="RUNNING")  # not FAILED or KILLED while it runs
            history = logger.experiment.get_metric_history
            logger.logged_through = {
                key: max((m.step for m in history(self.resumed, key)), default=-1)
                for key in logger.experiment.get_run(self.resumed).data.metrics
                if not key.startswith("test/")
            }

    def before_fit(self) -> None:
        self._resume_run()
        checkpoint = self.trainer.checkpoint_callback
        if "val" not in self.datamodule.splits and checkpoint.monitor and checkpoint.monitor.startswith("val/"):
            checkpoint.monitor = None  # nothing to rank by: keep the latest

    before_validate = before_test = before_predict = _resume_run

    def _keep_status(self) -> None:
        """A test, validation or prediction logs into a fit's run without changing how that fit ended."""
        logger = mlflow_logger(self.trainer)
        if self.resumed and self.status and logger is not None and self.trainer.is_global_zero:
            logger.experiment.update_run(self.resumed, status=self.status)

    after_validate = after_test = after_predict = _keep_status

    def fit(self, model, datamodule, **kwargs) -> None:
        """Fit; then test the best checkpoint, log it as an MLflow model and register it, in the same run.
        SIGTERM or Ctrl-C: a resumable checkpoint, the run marked KILLED, how to resume, exit 143 / 130."""
        tracking = next(c for c in self.trainer.callbacks if isinstance(c, Tracking))
        try:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
        except SystemExit:
            if tracking.stopped is None:
                raise
            signum = tracking.stopped
            saved = next((c.saved for c in self.trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            if self.trainer.is_global_zero:
                recipe = self.config_init.fit.get("config")
                again = f"cnnlab fit --config {recipe[-1]}" if recipe else "the same cnnlab fit command"
                print(
                    f"cnnlab: stopped by {signal.Signals(signum).name} in epoch {self.trainer.current_epoch}; "
                    + (
                        f"saved {saved}. Resume with `{again} --ckpt_path last`."
                        if saved
                        else "no checkpoint saved (checkpoint.save_last is off)."
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(128 + signum) from None
        if self.trainer.interrupted:
            return
        config, logger = self.config_init.fit, mlflow_logger(self.trainer)
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if config.test_after_fit and "test" in datamodule.splits:
            results = self.trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            if self.trainer.is_global_zero and results:
                print(
                    "cnnlab: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results[0].items()) if k.count("/") == 1)
                )
        elif best:
            model.load_state_dict(torch.load(best, map_location=model.device, weights_only=True)["state_dict"])
        if logger is None or not self.trainer.is_global_zero:
            return
        if config.log_model:
            log_model(logger, model, datamodule)
        if config.register:
            from cnnlab.registry import register

            version = register(logger.run_id, config.register)
            print(
                f"cnnlab: registered {config.register} v{version.version} (alias challenger); "
                f"promote it with `cnnlab promote {config.register}`"
            )
        where = logger.tracking_uri
        browse = f"open {where}" if where.startswith("http") else "browse it with `cnnlab ui`"
        print(f"cnnlab: MLflow run {logger.run_id} in {where}; {browse}")

    def predict(self, model, datamodule, **kwargs) -> None:
        batches = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        if not self.trainer.is_global_zero or not batches:
            return
        probs = torch.cat(batches)
        samples = datamodule.splits["test"]
        out = Path(self.trainer.default_root_dir) / "predictions.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["item", "label", "predicted", "probability"])
            for i, row in enumerate(probs):
                writer.writerow(
                    [
                        samples.name(i),
                        datamodule.classes[samples.labels[i]],
                        datamodule.classes[int(row.argmax())],
                        f"{float(row.max()):.4f}",
                    ]
                )
        from torchmetrics.functional.classification import multiclass_accuracy

        truth = torch.tensor(samples.labels[: len(probs)])
        accuracy = multiclass_accuracy(probs, truth, datamodule.num_classes, average="micro")
        print(f"cnnlab: {len(probs)} predictions (top-1 {accuracy:.4f}) written to {out}")


def batch_size(batch) -> int:
    return 0 if batch is None else len(batch[0])  # None: every image of the batch was bad and skipped


def explain_recipe_error(message: str, keys: list[str]) -> str:
    """jsonargparse's error as one paragraph that names the key and the valid choices."""
    where = re.search(r'Parser key "([^"]+)"', message)
    prefix = f"recipe key '{where[1]}': " if where else "recipe: "
    unknown = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"unrecognized arguments: --([^\s=]+)", message
    )
    if unknown:
        return (
            f"recipe key '{unknown[1]}' is not known.{did_you_mean(unknown[1], keys)} "
            "`cnnlab fit --help` lists every key."
        )
    option, class_path = (
        re.search(r"Option '(\w+)' is not accepted", message),
        re.search(r"class_path[ =]'([\w.]+)'", message),
    )
    if option and class_path:
        module, _, name = class_path[1].rpartition(".")
        accepted = [
            p
            for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
            if p not in ("self", "params", "optimizer", "last_epoch", "args", "kwargs")
        ]
        return (
            f"{prefix}{class_path[1]} has no argument '{option[1]}'.{did_you_mean(option[1], accepted)} "
            f"It accepts: {', '.join(accepted)}."
        )
    if missing := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        names = [n for n in dir(importlib.import_module(missing[1])) if n[:1].isupper()]
        return f"{prefix}{missing[1]}.{missing[2]} does not exist.{did_you_mean(missing[2], names)}"
    lines = [
        line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith("Given value")
    ]
    return prefix + " ".join(lines[1:] if where else lines)


def run_recipe(argv: list[str]) -> None:
    for flag, value in zip(argv, argv[1:]):
        path = (
            value if flag in ("--config", "-c") else (flag.split("=", 1)[1] if flag.startswith("--config=") else None)
        )
        if path and not Path(path).is_file():
            raise UserError(f"--config {path}: no such file. Recipes live in recipes/ (e.g. recipes/quickstart.yaml).")
    CnnlabCLI(args=argv)
