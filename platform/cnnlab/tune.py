"""`cnnlab tune`: an Optuna study over any recipe, one `cnnlab fit` process per trial, one MLflow parent run.

Each trial draws its values once, here, and writes them into a recipe that a `cnnlab fit` process trains
(on one device or with DDP alike), with the pruning callback reporting to the study's storage and the MLflow
logger writing into a run nested under the study's. Several workers share a study through its storage;
other machines join with the same --study and a PostgreSQL --storage.

With `--target RUNTIME` the study has two objectives: the metric and the latency of the trial's model on that
runtime (converted as `cnnlab export` would, timed at batch 1 here). Its Pareto front is printed, plotted and,
with `--register NAME`, registered: one version per trial on the front.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Literal

import yaml

from cnnlab import UserError
from cnnlab.studies import PRUNED_AT, PRUNERS, make_pruner, open_storage, redact, storage_url
from cnnlab.supervisor import apply, end_all, remove_stale_temp, signal_all, why_failed
from cnnlab.supervisor import fit as fit_process

SAMPLERS = ("tpe", "random", "cmaes", "qmc", "grid")
TARGETS = ("onnx-int8", "onnx", "openvino", "openvino-int8", "torch")
TYPES = ("float", "int", "categorical")


def encode(choice):
    """A dict or list value as a JSON string (Optuna stores only plain values)."""
    return json.dumps(choice, sort_keys=True) if isinstance(choice, (dict, list)) else choice


def decode(value):
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


# ---- the search space ------------------------------------------------------------------------------------


def load_space(path: str) -> tuple[dict, dict]:
    """({dotted recipe key: optuna distribution}, {key: grid values}) from YAML; categorical dicts and lists
    travel through Optuna as JSON strings."""
    import optuna.distributions as d

    if not Path(path).exists():
        raise UserError(f"--space {path}: no such file.")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise UserError(
            f"--space {path}: expected a mapping of recipe keys to distributions, e.g. "
            "model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}"
        )
    space, grids = {}, {}
    for key, spec in raw.items():
        where = f"--space {path}: key '{key}'"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise UserError(f"{where} needs a `type`: one of {', '.join(TYPES)}.")
        try:
            if spec["type"] == "categorical":
                choices = spec["choices"]
                if not isinstance(choices, list) or not choices:
                    raise ValueError("`choices` must be a non-empty list")
                space[key] = d.CategoricalDistribution([encode(c) for c in choices])
            else:
                low, high = spec["low"], spec["high"]
                number = float if spec["type"] == "float" else int
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                    raise ValueError(f"low and high must be numbers, got {low!r} and {high!r}")
                if spec["type"] == "int" and not all(float(v).is_integer() for v in (low, high)):
                    raise ValueError(f"an int range needs whole numbers, got {low!r} and {high!r}")
                if low > high:
                    raise ValueError(f"low={low} is above high={high}")
                step = spec.get("step", None if number is float else 1)
                cls = d.FloatDistribution if number is float else d.IntDistribution
                space[key] = cls(number(low), number(high), log=bool(spec.get("log", False)), step=step)
            unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "grid"}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
        except KeyError as err:
            raise UserError(f"{where} is missing {err}.") from None
        except ValueError as err:
            raise UserError(f"{where}: {err}.") from None
        if "grid" in spec:
            grids[key] = spec["grid"]
    return space, grids


def check_recipe(recipe: dict, what: str) -> None:
    """Parse a recipe as `cnnlab fit` would (no training); a mistake comes back naming `what`."""
    from cnnlab.run import CnnlabCLI

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                CnnlabCLI(args=["fit", "--config", str(path), "--print_config"])
        except SystemExit:
            return
        except UserError as err:
            raise UserError(f"{what}: {err}") from None


def check_space(recipe: dict, space: dict, path: str) -> None:
    """Every key and every extreme of every distribution must make a valid recipe, before any trial runs."""
    import optuna.distributions as d

    check_recipe(recipe, "--config")
    for key, dist in space.items():
        values = dist.choices if isinstance(dist, d.CategoricalDistribution) else (dist.low, dist.high)
        for value in values:
            check_recipe(apply(recipe, {key: decode(value)}), f"--space {path}: key '{key}' = {value!r}")


# ---- running a study ---------------------------------------------------------------------------------------


class TrialFailed(Exception):
    """A trial's fit ended in an error; Optuna records the message as the trial's fail reason."""


def suggest(trial, key: str, dist):
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, d.FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)


def make_sampler(name: str, space: dict, grids: dict, seed: int | None):
    import optuna
    import optuna.distributions as d

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    grid = {}
    for key, dist in space.items():
        if key in grids:
            grid[key] = [encode(v) for v in grids[key]]
        elif isinstance(dist, d.CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, d.IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise UserError(f"--sampler grid needs the values of '{key}': add `grid: [...]` to it in the space.")
    return optuna.samplers.GridSampler(grid, seed=seed)


class Study:
    """One `cnnlab tune` invocation: the Optuna study, its MLflow parent run, and the trial runner."""

    stopped: str | None = None  # the signal that stopped this invocation (SIGTERM, SIGINT)

    def __init__(
        self,
        config: str,
        space_path: str,
        study_name: str | None,
        storage: str | None,
        sampler: str,
        pruner: str,
        metric: str,
        direction: str,
        seed: int | None = None,
        heartbeat: float = 60,
        target: str | None = None,
        latency_runs: int = 50,
        latency_threads: int = 1,
    ):
        import threading

        import optuna

        from cnnlab.store import default_tracking_uri

        if not Path(config).exists():
            raise UserError(f"--config {config}: no such file.")
        self.recipe = yaml.safe_load(Path(config).read_text()) or {}
        self.space_path, (self.space, grids) = space_path, load_space(space_path)
        check_space(self.recipe, self.space, space_path)
        self.name = study_name or f"{Path(config).stem}-{Path(space_path).stem}"
        self.storage_url = storage_url(storage)
        self.metric, self.direction, self.target = metric, direction, target
        self.latency_runs, self.latency_threads, self.timing = latency_runs, latency_threads, threading.Lock()
        # Optuna prunes no trial of two objectives; and a fast network still learning is what a front needs
        self.pruner_name = "none" if target else pruner
        directions = [direction, "minimize"] if target else [direction]
        trainer = self.recipe.get("trainer") or {}
        self.max_epochs = int(trainer.get("max_epochs") or 10)
        self.storage = open_storage(self.storage_url, heartbeat)
        self.study = optuna.create_study(
            study_name=self.name,
            storage=self.storage,
            directions=directions,
            sampler=make_sampler(sampler, self.space, grids, seed),
            pruner=make_pruner(self.pruner_name, self.max_epochs),
            load_if_exists=True,
        )
        found = [d.name.lower() for d in self.study.directions]
        if found != directions:
            raise UserError(
                f"--study {self.name} exists with objectives {' and '.join(found)}, not {' and '.join(directions)}"
                f"{' (a --target study: metric and latency)' if len(found) == 2 else ''}. Use another --study name."
            )
        if target and self.study.user_attrs.get("target", target) != target:
            raise UserError(
                f"--study {self.name} times its trials on {self.study.user_attrs['target']}, not {target}. "
                "Use another --study name."
            )
        self.tracking_uri = default_tracking_uri()
        logger = trainer.get("logger") if isinstance(trainer.get("logger"), dict) else {}
        self.experiment = (logger.get("init_args") or {}).get("experiment_name", "cnnlab")
        self.sampler_name = sampler

    def parent_run(self):
        """The study's MLflow run (a context: it ends when this invocation does), shared by every worker and
        every resumption of the study."""
        from cnnlab import store

        parent = self.study.user_attrs.get("mlflow_parent_run")
        if parent:
            with contextlib.suppress(Exception):
                store.client(self.tracking_uri).get_run(parent)
                return store.run(run_id=parent, uri=self.tracking_uri)
        tags = {"optuna.study": self.name, "optuna.storage": redact(self.storage_url), "cnnlab.role": "study"}
        return store.run(f"study-{self.name}", tags, self.experiment, uri=self.tracking_uri)

    def describe(self, run) -> None:
        """A new parent run's params (the study's settings and space), base recipe and space file."""
        if self.study.user_attrs.get("mlflow_parent_run") == run.id:
            return
        params = {
            "study": self.name,
            "sampler": self.sampler_name,
            "pruner": self.pruner_name,
            "metric": self.metric,
            "direction": self.direction,
            **{f"space.{k}": repr(v)[:500] for k, v in self.space.items()},
        }
        for key, value in params.items():
            run.client.log_param(run.id, key, value)
        run.client.log_text(run.id, yaml.safe_dump(self.recipe, sort_keys=False), "base_recipe.yaml")
        run.client.log_artifact(run.id, self.space_path, "space")
        self.study.set_user_attr("mlflow_parent_run", run.id)

    def objective(self, trial) -> float:
        from cnnlab import store

        overrides = {key: decode(suggest(trial, key, dist)) for key, dist in self.space.items()}
        recipe = apply(self.recipe, overrides)
        trial.set_user_attr("recipe", json.dumps(recipe))
        trial.set_user_attr("threads", self.threads)
        tags = {"mlflow.parentRunId": self.parent, "optuna.study": self.name, "optuna.trial": str(trial.number)}
        with store.run(f"trial-{trial.number}", tags, self.experiment, uri=self.tracking_uri) as run:
            trial.set_user_attr("mlflow_run_id", run.id)
            return self.run_trial(trial, recipe, run)

    def run_trial(self, trial, recipe: dict, run) -> float | tuple[float, float]:
        """One trial's fit in its own process, logging into `run`; its outcome recorded on both (the run's status
        set before TrialFailed or TrialPruned tells Optuna). With a target, the fit tests and logs its best
        epoch's model, which is then timed on the target: (metric, milliseconds)."""
        import optuna

        runnable = apply(
            recipe,
            {"checkpoint.monitor": self.metric, "checkpoint.mode": "max" if self.direction == "maximize" else "min"},
        )
        trainer = runnable.setdefault("trainer", {})
        trainer["callbacks"] = [
            *(trainer.get("callbacks") or []),
            {
                "class_path": "cnnlab.callbacks.OptunaPruning",
                "init_args": {
                    "storage": self.storage_url,
                    "study_name": self.name,
                    "trial_number": trial.number,
                    "monitor": self.metric,
                    "pruner": self.pruner_name,
                    "max_epochs": self.max_epochs,
                },
            },
        ]
        started = time.time()
        proc = fit_process(
            runnable,
            run.id,
            self.experiment,
            self.tracking_uri,
            name=f"trial-{trial.number}",
            env={"OMP_NUM_THREADS": self.threads},
            extra=["--checkpoint.save_top_k=1", "--checkpoint.save_last=false"]  # the model on the front
            if self.target
            else [
                "--test_after_fit=false",
                "--log_model=false",  # the best recipe is refit, so
                "--checkpoint.save_top_k=0",
                "--checkpoint.save_last=false",
            ],
        )  # no checkpoints
        study_id = self.storage.get_study_id_from_name(self.name)
        frozen = self.storage.get_trial(self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        scores = frozen.intermediate_values  # what the trial's process reported, epoch by epoch
        trial.set_user_attr("epochs", len(scores))
        trial.set_user_attr("seconds", round(time.time() - started, 1))
        if self.stopped and proc.returncode != 0:
            reason = f"stopped by {self.stopped} after {len(scores)} epoch(s); the study resumes with the same command"
            self._finish(trial, run, "FAIL", reason)
            run.status = "KILLED"
            raise TrialFailed(reason)
        if proc.returncode != 0 or not scores:
            reason = why_failed(proc) if proc.returncode else f"the fit never logged {self.metric} (no val split?)"
            self._finish(trial, run, "FAIL", reason)
            raise TrialFailed(reason)
        if PRUNED_AT in frozen.user_attrs:
            self._finish(trial, run, "PRUNED", f"pruned after epoch {frozen.user_attrs[PRUNED_AT]}")
            raise optuna.TrialPruned(f"pruned after epoch {frozen.user_attrs[PRUNED_AT]}")
        best = (max if self.direction == "maximize" else min)(scores.values())
        if not self.target:
            self._finish(trial, run, "COMPLETE", f"{self.metric} {best:.4f}")
            return best
        try:
            ms, mb = self.latency(run.id)
        except Exception as err:  # a model the target cannot run fails its trial, not the study
            reason = f"timing on {self.target} failed: {type(err).__name__}: {str(err)[:300]}"
            self._finish(trial, run, "FAIL", reason)
            raise TrialFailed(reason) from None
        trial.set_user_attr("mb", round(mb, 3))
        run.client.log_metric(run.id, "latency_ms", ms)
        self._finish(trial, run, "COMPLETE", f"{self.metric} {best:.4f}, {ms:.3f} ms on {self.target}")
        return best, ms

    def latency(self, run_id: str) -> tuple[float, float]:
        """The run's logged model converted for the target (int8 calibrated on its training split), timed at
        batch 1: (median ms, MB). One timing at a time in this process; the other workers' fits still run."""
        from cnnlab import load
        from cnnlab.cnnlab_model import load_network
        from cnnlab.data import labelled
        from cnnlab.evaluate import latency_ms
        from cnnlab.export import convert

        with self.timing, tempfile.TemporaryDirectory(prefix="cnnlab-tune-") as tmp:
            network = load.model(run_id, self.latency_threads, program=True)
            if self.target != "torch":
                fmt, _, int8 = self.target.partition("-")
                train = labelled(network.meta, None)[0].splits["train"] if int8 else None
                convert(network, Path(tmp) / "model", fmt, bool(int8), train)
                network = load_network(Path(tmp) / "model", self.latency_threads)
            ms = latency_ms(network.predict, network.image_size, 1, self.latency_runs)
            return ms, network.meta.get("bytes", 4 * network.params) / 1e6

    def register_front(self, name: str) -> None:
        """Every trial on the Pareto front as a version of NAME (fastest first, so the most accurate ends as the
        challenger), tagged with its metric and latency; a trial registered by an earlier invocation is not again."""
        from cnnlab import store
        from cnnlab.registry import register

        client, done = store.client(self.tracking_uri), dict(self.study.user_attrs.get("registered") or {})
        for t in sorted(self.study.best_trials, key=lambda t: t.values[1]):
            key = f"{name}/{t.number}"
            if key not in done:
                version = register(t.user_attrs["mlflow_run_id"], name).version
                tags = {self.metric: f"{t.values[0]:.6g}", "latency_ms": f"{t.values[1]:.4g}", "target": self.target}
                tags |= {"threads": self.latency_threads, "study": self.name, "trial": t.number}
                for tag, value in tags.items():
                    client.set_model_version_tag(name, version, f"tune.{tag}", str(value))
                done[key] = version
                self.study.set_user_attr("registered", done)
            print(f"registered {name} v{done[key]}: trial {t.number}, {self.metric} {t.values[0]:.4f}, "
                  f"{t.values[1]:.3f} ms on {self.target}")  # fmt: skip

    def _finish(self, trial, run, state: str, note: str) -> None:
        """Record the outcome on the trial and on its MLflow run (pruned: KILLED, failed: FAILED)."""
        print(f"trial {trial.number}: {state.lower()}, {note}", flush=True)
        if state == "FAIL":
            trial.set_user_attr("fail_reason", note)
        run.client.set_tag(run.id, "optuna.state", state)
        run.client.set_tag(run.id, "optuna.outcome", note[:5000])
        run.status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[state]

    def optimize(self, n_trials: int | None, timeout: float | None, workers: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own one-line outcome
        # the workers' trials share the cores: two 2-core quickstart fits ran 2.8x slower with a thread per core each
        self.threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // workers))
        self.study.optimize(
            self.objective,
            n_trials=n_trials,
            timeout=timeout,
            n_jobs=workers,
            catch=(TrialFailed,),
            gc_after_trial=False,
            callbacks=[lambda study, trial: study.stop() if self.stopped else None],  # no new trial after a stop
        )

    def finish(self, client, out_dir: str = "recipes/tuned") -> Path | None:
        """The best recipe to recipes/tuned/<study>.yaml, plots and the leaderboard to the parent run."""
        states = [t.state.name for t in self.study.trials]
        for state in ("COMPLETE", "PRUNED", "FAIL"):
            client.log_metric(self.parent, f"trials/{state.lower()}", states.count(state))
        client.log_text(self.parent, leaderboard(self.study, self.metric), "leaderboard.txt")
        names = [self.metric, f"ms at batch 1 ({self.target})"] if self.target else None
        with tempfile.TemporaryDirectory() as tmp:
            for path in plots(self.study, Path(tmp), names):
                client.log_artifact(self.parent, str(path), "plots")
        if self.target:
            client.log_text(self.parent, front_table(self.study, self.metric, self.target), "pareto_front.txt")
            client.log_metric(self.parent, "pareto_front/trials", len(self.study.best_trials))
            return None  # no one best recipe: each trial's run holds its own
        written = None
        try:
            best = self.study.best_trial
        except ValueError:
            best = None
        if best is not None:
            client.log_metric(self.parent, f"best/{self.metric}", best.value)
            client.set_tag(self.parent, "optuna.best_trial", str(best.number))
            written = Path(out_dir) / f"{self.name}.yaml"
            written.parent.mkdir(parents=True, exist_ok=True)
            threads = best.user_attrs.get("threads")  # absent on trials of a study begun before it was recorded
            header = (
                f"# Best trial ({best.number}) of the Optuna study '{self.name}': {self.metric} = {best.value:.4f}\n"
                f"# (storage {redact(self.storage_url)}). Drawn values: "
                f"{', '.join(f'{k}={_show(v)}' for k, v in best.params.items())}\n"
                f"# Run:    {f'OMP_NUM_THREADS={threads} ' if threads else ''}cnnlab fit --config {written}\n"
                f"# Expect: {self.metric} {best.value:.4f} on validation, as in the study (on a CPU, the "
                "trial's thread count repeats its numbers exactly).\n"
            )
            written.write_text(header + yaml.safe_dump(json.loads(best.user_attrs["recipe"]), sort_keys=False))
            client.log_artifact(self.parent, str(written), "tuned")
        return written


def _show(value) -> str:
    value = decode(value)
    return (
        f"{value:.4g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, (dict, list))
        else str(value)
    )


def leaderboard(study, metric: str) -> str:
    """Trials best first (by the metric): number, state, value (and latency, * on the Pareto front, in a study
    of two objectives), epochs, seconds, drawn values."""
    reverse = study.directions[0].name == "MAXIMIZE"
    two = len(study.directions) > 1
    front = {t.number for t in study.best_trials} if two else set()
    trials = sorted(
        study.trials,
        key=lambda t: (
            t.state.name != "COMPLETE",
            -(t.values or [0])[0] if reverse else (t.values[0] if t.values else math.inf),
            t.number,
        ),
    )
    objectives = f"{metric} ({study.directions[0].name.lower()})" + (", ms (minimize), * on the front" if two else "")
    ms_head = f" {'ms':>8} " if two else ""
    rows = [
        f"study {study.study_name}: {len(trials)} trials, {objectives}",
        f"{'trial':>5} {'state':<9} {metric:>10}{ms_head} {'epochs':>6} {'seconds':>8}  params",
    ]
    for t in trials:
        value = f"{t.values[0]:.4f}" if t.values else "-"
        ms = (
            (f" {t.values[1]:>8.3f}" + ("*" if t.number in front else " ") if t.values else f" {'-':>8} ")
            if two
            else ""
        )
        params = ", ".join(f"{k}={_show(v)}" for k, v in t.params.items())
        reason = f"  ({t.user_attrs.get('fail_reason', '')[:100]})" if t.state.name == "FAIL" else ""
        rows.append(
            f"{t.number:>5} {t.state.name:<9} {value:>10}{ms} {t.user_attrs.get('epochs', '-'):>6} "
            f"{t.user_attrs.get('seconds', '-'):>8}  {params}{reason}"
        )
    return "\n".join(rows) + "\n"


def front_table(study, metric: str, target: str) -> str:
    """The Pareto front, fastest first: trial, metric, latency on the target, MB, the trial's drawn values."""
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    rows = [
        f"Pareto front of {study.study_name}: {len(front)} trial(s), {metric} against ms at batch 1 on {target}",
        f"{'trial':>5} {metric:>10} {'ms':>9} {'MB':>7}  params",
    ]
    for t in front:
        params = ", ".join(f"{k}={_show(v)}" for k, v in t.params.items())
        rows.append(
            f"{t.number:>5} {t.values[0]:>10.4f} {t.values[1]:>9.3f} {t.user_attrs.get('mb', 0):>7.2f}  {params}"
        )
    return "\n".join(rows) + "\n"


def plots(study, folder: Path, names: list[str] | None = None) -> list[Path]:
    """Optuna's own matplotlib plots as PNGs (those the finished trials allow); in a study of two objectives
    (`names`), the Pareto front and the others on the first objective."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    out = []
    first = {"target": lambda t: t.values[0], "target_name": names[0]} if names else {}
    for name, fn in (
        ("pareto_front", lambda s: vis.plot_pareto_front(s, target_names=names) if names else None),
        ("optimization_history", lambda s: vis.plot_optimization_history(s, **first)),
        ("param_importances", lambda s: vis.plot_param_importances(s, **first)),
        ("parallel_coordinate", lambda s: vis.plot_parallel_coordinate(s, **first)),
        ("intermediate_values", vis.plot_intermediate_values),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = fn(study)
            if axes is None:
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=90)
            plt.close(figure)
            out.append(folder / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances need two complete trials
    return out


def show_study(study_name: str, storage: str | None) -> int:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        names = optuna.get_all_study_names(open_storage(storage))
        raise UserError(
            f"no study '{study_name}' in {redact(storage_url(storage))}. Studies: {', '.join(names) or 'none'}."
        ) from None
    print(leaderboard(study, study.user_attrs.get("metric", "value")), end="")
    return 0


def tune(
    config: str | None = None,
    space: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    workers: int = 1,
    sampler: Literal[SAMPLERS] = "tpe",
    pruner: Literal[PRUNERS] = "median",
    metric: str = "val/acc",
    direction: Literal["maximize", "minimize"] = "maximize",
    seed: int | None = None,
    out_dir: str = "recipes/tuned",
    heartbeat: float = 60,
    target: Literal[TARGETS] | None = None,
    latency_runs: int = 50,
    latency_threads: int = 1,
    register: str | None = None,
    show: str | None = None,
) -> int:
    """An Optuna study over a recipe: pruned trials, workers, one MLflow parent run with a nested run per trial.

    Args:
        config: the recipe to tune
        space: YAML: dotted recipe keys to distributions (see recipes/spaces/)
        n_trials: trials to run in this invocation (all workers together)
        timeout: start no trial after this many seconds
        study: study name (RECIPE-SPACE); an existing study resumes
        storage: any SQLAlchemy URL (sqlite:///mlruns/optuna.db)
        workers: trials run at once on this machine
        sampler: Optuna's sampler
        pruner: Optuna's pruner
        metric: the validation metric to optimize
        direction: of the metric
        seed: sampler seed
        out_dir: where the best recipe is written
        heartbeat: seconds between a running trial's heartbeats; trials of a killed study that miss two are
            failed when it resumes
        target: a second objective, latency on this runtime: each complete trial's model is converted for it and
            timed at batch 1; the study keeps the Pareto front of the metric and the latency (no pruning)
        latency_runs: timed runs per trial (the median is kept)
        latency_threads: CPU threads for the timing (the serving machine's)
        register: with --target, register every trial on the Pareto front as a version of this name, tagged
            with its metric and latency
        show: print this study's leaderboard and exit
    """
    if show:
        return show_study(show, storage)
    if not config or not space:
        raise UserError("cnnlab tune needs --config RECIPE and --space SPACE.yaml (or --show STUDY).")
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1.")
    if n_trials is None and timeout is None:
        raise UserError("give --n-trials N or --timeout SECONDS (or both) so the study ends.")
    if register and not target:
        raise UserError(
            "--register NAME registers the Pareto front of a --target study. A study of one metric writes its best "
            "recipe: fit that with `cnnlab fit --config recipes/tuned/STUDY.yaml --register NAME`."
        )
    if latency_runs < 1 or latency_threads < 1:
        raise UserError(f"--latency-runs {latency_runs} and --latency-threads {latency_threads} must be at least 1.")
    if target and target.startswith("openvino"):
        from cnnlab.export import openvino_installed

        if not openvino_installed():
            raise UserError(f'--target {target} needs OpenVINO: pip install "cnnlab[openvino]".')
    remove_stale_temp()
    runner = Study(
        config, space, study, storage, sampler, pruner, metric, direction, seed, heartbeat, target, latency_runs,
        latency_threads,
    )  # fmt: skip
    runner.study.set_user_attr("metric", metric)
    if target:
        runner.study.set_user_attr("target", target)
    objectives = (
        f"{direction} {metric} and minimize ms at batch 1 on {target} ({latency_threads} thread(s)), no pruning"
        if target
        else f"{pruner} pruner, {direction} {metric}"
    )
    print(
        f"study '{runner.name}' in {redact(runner.storage_url)}: {n_trials or 'unlimited'} trials, "
        f"{workers} worker(s), {sampler} sampler, {objectives}",
        flush=True,
    )

    def stop(signum, frame):  # the running trials end now (each recorded as stopped); no new one starts
        runner.stopped = signal.Signals(signum).name
        print(f"cnnlab tune: {runner.stopped}: ending the running trials", flush=True)
        signal_all(signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    with runner.parent_run() as parent:
        runner.describe(parent)
        runner.parent = parent.id
        try:
            runner.optimize(n_trials, timeout, workers)
        finally:
            end_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        written = runner.finish(parent.client, out_dir)
        if runner.stopped:
            print(leaderboard(runner.study, metric), end="")
            print(f"cnnlab tune: stopped by {runner.stopped}; `cnnlab tune` with the same --study resumes the study")
            parent.status = "KILLED"
            return 128 + getattr(signal, runner.stopped)
    print(leaderboard(runner.study, metric), end="")
    if written:
        print(f"best recipe: {written} (fit it with `cnnlab fit --config {written}`)")
    if target:
        print(front_table(runner.study, metric, target), end="")
        if register:
            runner.register_front(register)
    print(f"MLflow: parent run {runner.parent} with one nested run per trial, in {runner.tracking_uri}")
    return 0
