"""Optuna studies through `cnnlab tune`: workers, both storages, pruning, failures, nesting, the best recipe."""

import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from cnnlab.cli import main
from cnnlab.tune import open_storage
from conftest import cnnlab, cnnlab_here, mlflow_client, processes, require

SPACE = {
    "model.optimizer.init_args.lr": {"type": "float", "low": 0.05, "high": 0.4, "log": True},
    "model.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "data.batch_size": {"type": "int", "low": 64, "high": 128, "step": 64},
}


def write_space(workdir, space, name="space.yaml"):
    (workdir / name).write_text(yaml.safe_dump(space))
    return workdir / name


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, workdir):
    """(Optuna storage, MLflow tracking URI, env for the command)."""
    if request.param == "postgres":
        storage = require("CNNLAB_TEST_POSTGRES", "PostgreSQL")
        server = require("CNNLAB_TEST_MLFLOW_SERVER", "an MLflow server backed by PostgreSQL")
        return storage, server, {"MLFLOW_TRACKING_URI": server}
    return f"sqlite:///{workdir}/mlruns/optuna.db", f"sqlite:///{workdir}/mlruns/mlflow.db", {}


def nested_runs(client, parent_id):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, runs


@pytest.mark.slow
def test_six_trials_with_two_workers_all_accounted_for_and_nested_in_mlflow(small, stores, workdir):
    storage, tracking, env = stores
    name = f"six-{uuid.uuid4().hex[:8]}"
    recipe = yaml.safe_load(small.read_text())
    recipe["trainer"]["max_epochs"] = 2
    small.write_text(yaml.safe_dump(recipe))
    result = cnnlab(
        "tune",
        "--config",
        small,
        "--space",
        write_space(workdir, SPACE),
        "--n-trials",
        6,
        "--workers",
        2,
        "--study",
        name,
        "--storage",
        storage,
        "--seed",
        0,
        cwd=workdir,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials), result.stdout[-3000:]

    parent, runs = nested_runs(mlflow_client(tracking), study.user_attrs["mlflow_parent_run"])
    assert parent.data.tags["optuna.study"] == name and parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in runs) == [f"trial-{n}" for n in range(6)]
    for trial in study.trials:  # drawn once: the run trained exactly the trial's values
        run = next(r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.state"] == trial.state.name
        assert float(run.data.params["model.optimizer.init_args.lr"]) == pytest.approx(
            trial.params["model.optimizer.init_args.lr"]
        )
        assert len(mlflow_client(tracking).get_metric_history(run.info.run_id, "val/acc")) == trial.user_attrs["epochs"]
    client = mlflow_client(tracking)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= plots

    tuned = workdir / "recipes" / "tuned" / f"{name}.yaml"
    assert tuned.exists() and "Best trial" in tuned.read_text()
    shown = cnnlab_here("tune", "--show", name, "--storage", storage, cwd=workdir, env=env)
    assert shown.returncode == 0 and shown.stdout.count("\n") == 8 and f"study {name}" in shown.stdout
    if storage.startswith("sqlite"):  # the best recipe fits as it is, to the best trial's accuracy
        threads = study.best_trial.user_attrs["threads"]  # the cores shared out among the workers
        assert (
            threads == "1" and f"OMP_NUM_THREADS=1 cnnlab fit --config recipes/tuned/{name}.yaml" in tuned.read_text()
        )
        refit = cnnlab(
            "fit",
            "--config",
            tuned,
            "--trainer.enable_progress_bar=false",
            cwd=workdir,
            env={**env, "OMP_NUM_THREADS": threads},
        )
        assert refit.returncode == 0, refit.stderr[-3000:]
        run = max(
            client.search_runs([parent.info.experiment_id], f"tags.mlflow.runName = '{name}'"),
            key=lambda r: r.info.start_time,
        )
        best = max(m.value for m in client.get_metric_history(run.info.run_id, "val/acc"))
        assert best >= study.best_value - 0.005


@pytest.mark.slow
def test_median_pruner_stops_clearly_bad_learning_rates_and_the_study_resumes_by_name(small, workdir):
    name, storage = "prune", f"sqlite:///{workdir}/mlruns/optuna.db"
    good = cnnlab(
        "tune",
        "--config",
        small,
        "--space",
        write_space(workdir, SPACE),
        "--n-trials",
        3,
        "--study",
        name,
        "--seed",
        1,
        cwd=workdir,
    )
    assert good.returncode == 0, good.stderr[-3000:]
    bad = write_space(
        workdir, {"model.optimizer.init_args.lr": {"type": "float", "low": 1e-7, "high": 1e-6, "log": True}}, "bad.yaml"
    )
    resumed = cnnlab("tune", "--config", small, "--space", bad, "--n-trials", 2, "--study", name, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    assert all(t.user_attrs["epochs"] < 3 for t in study.trials[3:])  # stopped early
    assert "pruned after epoch" in resumed.stdout


@pytest.mark.slow
def test_failed_trials_keep_their_reason_and_the_study_goes_on(small, workdir):
    space = write_space(
        workdir,
        {
            "model.model": {"type": "categorical", "choices": ["resnet18", "inception_v4"]},
            "model.optimizer.init_args.lr": {"type": "categorical", "choices": [0.1, 1.0e12]},
        },
    )
    result = cnnlab(
        "tune",
        "--config",
        small,
        "--space",
        space,
        "--sampler",
        "grid",
        "--n-trials",
        4,
        "--workers",
        2,
        "--study",
        "fail",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="fail", storage=open_storage(f"sqlite:///{workdir}/mlruns/optuna.db"))
    outcome = {(t.params["model.model"], t.params["model.optimizer.init_args.lr"]): t for t in study.trials}
    assert outcome[("resnet18", 0.1)].state.name == "COMPLETE"
    assert "cannot" in outcome[("inception_v4", 0.1)].user_attrs["fail_reason"]
    diverged = outcome[("resnet18", 1.0e12)]
    assert diverged.state.name == "FAIL" and "diverged" in diverged.user_attrs["fail_reason"]


def study_running_two_trials(args: list, n_trials: int, workdir) -> tuple[subprocess.Popen, list[int]]:
    """`cnnlab tune ARGS --workers 2` in its own session, once two trial processes run: (the study, their pids)."""
    tune = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "tune", *map(str, args), "--n-trials", str(n_trials), "--workers", "2"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline, trials = time.time() + 180, []
    while time.time() < deadline and len(trials) < 2:
        assert tune.poll() is None, tune.communicate()[1][-3000:]
        time.sleep(0.5)
        trials = processes(1, tune.pid)
    return tune, trials


@pytest.mark.slow
def test_a_killed_study_leaves_no_trial_running_and_its_trials_fail_on_resume(small, workdir):
    storage, space = f"sqlite:///{workdir}/mlruns/optuna.db", write_space(workdir, SPACE)
    args = ["--config", small, "--space", space, "--study", "killed", "--storage", storage, "--heartbeat", 1]
    tune, trials = study_running_two_trials(args, 4, workdir)
    time.sleep(2)
    tune.kill()  # SIGKILL: nothing in cnnlab tune runs after this
    tune.wait()
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in trials) and time.time() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in trials if Path(f"/proc/{pid}").exists()], "trial processes outlived their study"

    time.sleep(3)  # past the grace period of two missed heartbeats
    resumed = cnnlab("tune", *args, "--n-trials", 1, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="killed", storage=open_storage(storage))
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("FAIL") >= 2, states
    assert not list(Path(tempfile.gettempdir()).glob(f"cnnlab-fit-{tune.pid}-*"))  # its temp folders went too


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"model.optimizer.init_args.lrr": {"type": "float", "low": 0.01, "high": 0.1}},
            "key 'model.optimizer.init_args.lrr'",
        ),
        ({"model.label_smoothing": {"type": "float", "low": 0.3, "high": 0.1}}, "low=0.3 is above high=0.1"),
        ({"data.batch_size": {"type": "categorical", "choices": ["big"]}}, "key 'data.batch_size' = 'big'"),
        ({"data.batch_size": {"type": "int", "low": 8.5, "high": 64}}, "whole numbers"),
        ({"model.act": {"type": "choice", "choices": ["relu"]}}, "needs a `type`"),
    ],
)
def test_a_bad_space_is_rejected_before_any_trial_runs(space, message, small, workdir, capsys):
    assert main(["tune", "--config", str(small), "--space", str(write_space(workdir, space)), "--n-trials", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "mlruns" / "optuna.db").exists() or not optuna.get_all_study_names(
        open_storage(f"sqlite:///{workdir}/mlruns/optuna.db")
    )


@pytest.mark.slow
def test_a_ddp_trial_draws_its_values_once_for_every_rank(small, workdir):
    recipe = yaml.safe_load(small.read_text())
    recipe["trainer"].update(devices=2, strategy="ddp", accelerator="cpu", max_epochs=2)
    (workdir / "ddp.yaml").write_text(yaml.safe_dump(recipe))
    result = cnnlab(
        "tune",
        "--config",
        workdir / "ddp.yaml",
        "--space",
        write_space(workdir, SPACE),
        "--n-trials",
        1,
        "--study",
        "ddp",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="ddp", storage=open_storage(f"sqlite:///{workdir}/mlruns/optuna.db"))
    (trial,) = study.trials
    assert trial.state.name == "COMPLETE" and trial.user_attrs["epochs"] == 2
    _, runs = nested_runs(mlflow_client(), study.user_attrs["mlflow_parent_run"])
    (run,) = runs
    assert float(run.data.params["model.optimizer.init_args.lr"]) == pytest.approx(
        trial.params["model.optimizer.init_args.lr"]
    )


def test_a_fit_ended_by_a_signal_is_said_so():
    """A trial's fit that crashes or is killed (no Python error of its own) names the signal in its fail reason."""
    from cnnlab.supervisor import why_failed

    script = "import os, signal, sys; print('Warning: last words', file=sys.stderr, flush=True); os.abort()"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert why_failed(proc) == "the fit was ended by SIGABRT; its last line: Warning: last words"
    proc = subprocess.run([sys.executable, "-c", "raise ValueError('bad value')"], capture_output=True, text=True)
    assert why_failed(proc) == "ValueError: bad value"


@pytest.mark.slow
def test_one_sigterm_ends_the_running_trials_at_once_and_the_study_resumes(small, workdir):
    recipe = yaml.safe_load(small.read_text())
    recipe["trainer"]["max_epochs"] = 40  # trials that would run for minutes
    (workdir / "long.yaml").write_text(yaml.safe_dump(recipe))
    storage, space = f"sqlite:///{workdir}/mlruns/optuna.db", write_space(workdir, SPACE)
    flags = ["--space", space, "--study", "stopped", "--storage", storage]
    tune, trials = study_running_two_trials(["--config", workdir / "long.yaml", *flags], 6, workdir)
    time.sleep(8)  # into their epochs
    tune.send_signal(signal.SIGTERM)
    stopped_at = time.time()
    while any(Path(f"/proc/{pid}").exists() for pid in trials) and time.time() < stopped_at + 60:
        time.sleep(0.2)
    ended_in = time.time() - stopped_at
    stdout, stderr = tune.communicate(timeout=120)
    assert ended_in < 10, f"the trials ran {ended_in:.1f} s after SIGTERM"
    assert tune.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "--study resumes" in stdout, stdout
    study = optuna.load_study(study_name="stopped", storage=open_storage(storage))
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # the two that ran; none started after
    assert all("stopped by SIGTERM" in t.user_attrs["fail_reason"] for t in study.trials)
    client = mlflow_client()
    experiment = client.get_experiment_by_name("cnnlab").experiment_id
    runs = {r.data.tags.get("optuna.trial"): r.info.status for r in client.search_runs([experiment])}
    assert runs == {"0": "KILLED", "1": "KILLED", None: "KILLED"}, runs  # both trials and the study's parent

    resumed = cnnlab("tune", "--config", small, *flags, "--n-trials", "1", cwd=workdir)  # short epochs this time
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = [t.state.name for t in optuna.load_study(study_name="stopped", storage=open_storage(storage)).trials]
    assert states == ["FAIL", "FAIL", "COMPLETE"]
