"""Complete tracking, the logged model, the registry's promotion gate and the UI, on both backends."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data import DataModule
from cnnlab.tracking import MLflowLogger
from conftest import (
    CHROMIUM_ARGS,
    QUICKSTART,
    ROOT,
    STORE_VARIABLES,
    cnnlab,
    cnnlab_here,
    free_port,
    mlflow_client,
    only_run,
    require,
)

FAST = ["--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.image_size=8"]  # 8 px: 4x less work


@pytest.fixture(params=["sqlite", "server"])
def backend(request, workdir):
    """(environment for the subprocess, tracking URI): the project's sqlite store, or an MLflow server on PostgreSQL."""
    if request.param == "server":
        url = require("CNNLAB_TEST_MLFLOW_SERVER", "an MLflow server backed by PostgreSQL")
        return {"MLFLOW_TRACKING_URI": url}, url
    return {}, f"sqlite:///{workdir}/mlruns/mlflow.db"


def test_run_records_system_data_preview_lr_and_model(quickstart):
    _, client, run, _ = quickstart
    tags = run.data.tags
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    dataset = run.inputs.dataset_inputs[0].dataset  # the UI's Datasets panel
    assert dataset.name == "digits" and dataset.digest == tags["cnnlab.data.fingerprint"][:36]
    assert tags["sys.torch"] and tags["cnnlab.version"] and "cnnlab.git_commit" in tags
    assert json.loads(tags["cnnlab.data.sizes"]) == {"train": 1169, "val": 269, "test": 359}
    assert sum(json.loads(tags["cnnlab.data.class_counts"]).values()) == 1797
    assert len(tags["cnnlab.data.fingerprint"].split("-")) == 3
    paths = {a.path for d in ("plots", "system", "data") for a in client.list_artifacts(run.info.run_id, d)}
    assert {
        "plots/augment_preview.png",
        "plots/confusion_matrix.png",
        "system/requirements.txt",
        "data/fingerprint.json",
    } <= paths
    freeze = Path(client.download_artifacts(run.info.run_id, "system/requirements.txt")).read_text()
    assert "torch==" in freeze and "mlflow==" in freeze
    lrs = client.get_metric_history(run.info.run_id, "lr/decay")  # LearningRateMonitor, every 10 steps
    assert len({m.step for m in lrs}) == 8 * 18 // 10 and 0.09 < max(m.value for m in lrs) <= 0.1  # one cycle
    assert tags["cnnlab.model_uri"].startswith("models:/m-")
    assert [f"models:/{m.model_id}" for m in run.outputs.model_outputs] == [tags["cnnlab.model_uri"]]


def test_params_too_long_for_mlflow_are_kept_whole_as_artifacts(workdir):
    logger = MLflowLogger(experiment_name="long-params")
    logger.log_hyperparams({"model": {"note": "x" * 7000, "lr": 0.1}})
    client = mlflow_client()
    run = client.get_run(logger.run_id)
    assert run.data.params == {"model.lr": "0.1"}
    assert Path(client.download_artifacts(logger.run_id, "params/model.note.txt")).read_text() == "x" * 7000


PYFUNC_CHECK = """
import sys, json, numpy as np, pandas as pd, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
data = np.load(sys.argv[3], allow_pickle=True)
images, encoded = data["images"], [bytes(b) for b in data["encoded"]]
out = {n: model.predict(pd.DataFrame({"image": list(images[:n])}))["label"].tolist() for n in (1, 8)}
out["bytes8"] = model.predict(pd.DataFrame({"image": encoded[:8]}))["label"].tolist()
out["all"] = model.predict({"image": list(images)})["label"].tolist()
out["signature"] = str(model.metadata.signature.inputs)
out["cnnlab_imported"] = any(m == "cnnlab" or m.startswith("cnnlab.") for m in sys.modules)
print(json.dumps(out))
"""


def digits_test_split(tmp_path: Path):
    """The digits test split as arrays and PNG bytes, saved for a process that has no cnnlab."""
    import io

    from PIL import Image

    samples = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits["test"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(samples.raw(i)))) for i in range(len(samples))])
    encoded = np.array([samples.raw(i) for i in range(len(samples))], dtype=object)
    np.savez(tmp_path / "digits.npz", images=images, encoded=encoded, labels=np.array(samples.labels))
    return tmp_path / "digits.npz", np.array(samples.labels)


def plain_python(uri: str, model_uri: str, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *STORE_VARIABLES)}
    result = subprocess.run(
        [sys.executable, "-c", PYFUNC_CHECK, uri, model_uri, str(data)],
        capture_output=True,
        text=True,
        env=env,
        cwd=data.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_logged_model_needs_no_cnnlab_and_takes_raw_images_at_batch_1_and_8(quickstart, tmp_path):
    cwd, client, run, _ = quickstart
    data, labels = digits_test_split(tmp_path)
    out = plain_python(f"sqlite:///{cwd}/mlruns/mlflow.db", run.data.tags["cnnlab.model_uri"], data)
    assert not out["cnnlab_imported"] and "'image': binary" in out["signature"]
    assert out["8"][:1] == out["1"] and out["bytes8"] == out["8"] == out["all"][:8]
    accuracy = np.mean(np.array(out["all"]).astype(int) == labels)
    assert accuracy == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)  # same pixels as cnnlab's own test


@pytest.mark.slow
def test_promoted_quickstart_champion_scores_95_percent_in_plain_python(quickstart, tmp_path):
    cwd, _, _, _ = quickstart
    assert cnnlab_here("promote", "digits", cwd=cwd).returncode == 0
    data, labels = digits_test_split(tmp_path)
    out = plain_python(f"sqlite:///{cwd}/mlruns/mlflow.db", "models:/digits@champion", data)
    assert np.mean(np.array(out["all"]).astype(int) == labels) >= 0.95


@pytest.mark.slow
def test_promotion_gate_refuses_a_worse_model_and_records_every_decision(backend, workdir):
    env, uri = backend
    name, experiment = f"digits-{uuid.uuid4().hex[:8]}", f"gate-{uuid.uuid4().hex[:8]}"
    common = [
        "fit",
        "--config",
        QUICKSTART,
        "--register",
        name,
        *FAST,
        f"--trainer.logger.init_args.experiment_name={experiment}",
    ]
    good = cnnlab(*common, "--trainer.max_epochs=2", cwd=workdir, env=env)
    assert good.returncode == 0, good.stderr[-3000:]
    client = mlflow_client(uri)
    run = only_run(client, experiment)
    assert {"cnnlab.data.fingerprint", "sys.torch", "cnnlab.model_uri"} <= set(run.data.tags)
    assert "plots/augment_preview.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    first = cnnlab_here("promote", name, cwd=workdir, env=env)
    assert first.returncode == 0 and "promoted" in first.stdout, first.stdout + first.stderr
    worse = cnnlab(*common, "--trainer.max_epochs=1", "--model.optimizer.init_args.lr=0.001", cwd=workdir, env=env)
    assert worse.returncode == 0, worse.stderr[-3000:]
    refused = cnnlab_here("promote", name, cwd=workdir, env=env)
    assert refused.returncode == 1 and "refused" in refused.stdout
    assert "candidate v2" in refused.stdout and "champion v1" in refused.stdout and "<- gate" in refused.stdout
    assert client.get_model_version_by_alias(name, "champion").version in ("1", 1)
    v2 = client.get_model_version(name, "2")
    assert v2.tags["promotion.decision"] == "refused" and v2.tags["promotion.champion_version"] == "1"
    assert float(v2.tags["promotion.candidate_score"]) < float(v2.tags["promotion.champion_score"])
    assert v2.tags["promotion.data_fingerprint"] and v2.tags["promotion.time"]

    forced = cnnlab_here("promote", name, "--version", "2", "--force", cwd=workdir, env=env)
    assert forced.returncode == 0 and str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "forced"
    rollback = cnnlab_here("promote", name, "--version", "1", "--force", cwd=workdir, env=env)
    assert rollback.returncode == 0 and str(client.get_model_version_by_alias(name, "champion").version) == "1"
    description = client.get_model_version(name, "2").description
    assert "refused" in description and "forced" in description and "```yaml" in description

    listing = cnnlab_here("models", name, cwd=workdir, env=env)
    assert listing.returncode == 0
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [(r[1], r[2]) for r in rows] == [("2", "challenger"), ("1", "champion")]


def test_register_and_promote_explain_bad_names(workdir):
    assert "'nope' is not a model in" in cnnlab_here("register", "nope", "--name", "x", cwd=workdir).stderr
    result = cnnlab_here("promote", "nope", cwd=workdir)
    assert result.returncode == 2 and "no version (latest) of a registered model 'nope'" in result.stderr


@pytest.mark.slow
def test_ui_shows_the_quickstart_run_and_the_champion_in_a_real_browser(quickstart):
    executable = require("CNNLAB_TEST_CHROMIUM", "Chromium")
    from playwright.sync_api import sync_playwright

    cwd = quickstart[0]
    assert cnnlab_here("promote", "digits", cwd=cwd).returncode == 0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    ui = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "ui", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    try:
        link = ui.stdout.readline().split(" at ")[1].split()[0]  # the experiment's runs page
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/") and link.endswith("/runs"), link
        deadline = time.time() + 120
        while socket.socket().connect_ex(("127.0.0.1", port)) and time.time() < deadline:
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})  # a new context: a fresh profile
            page.goto(link, timeout=60_000)
            # What a newcomer sees first, without a click: the runs table, with the latest run in it.
            page.get_by_role("link", name="quickstart").first.wait_for(timeout=60_000)
            page.screenshot(path=shots / "ui_runs_table.png", full_page=True)
            page.get_by_role("link", name="quickstart").first.click()
            page.get_by_text("test/acc", exact=True).first.wait_for(timeout=30_000)
            assert "val/acc" in page.inner_text("body")
            page.screenshot(path=shots / "ui_quickstart_run.png", full_page=True)
            page.goto(f"http://127.0.0.1:{port}/#/models/digits")
            if page.get_by_role("button", name="Try it now").count():
                page.get_by_role("button", name="Try it now").click()
            page.get_by_text("champion").first.wait_for(timeout=30_000)
            page.screenshot(path=shots / "ui_registered_champion.png", full_page=True)
            browser.close()
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    assert (shots / "ui_quickstart_run.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_tracking_server_outage_during_a_fit_loses_no_metric(workdir):
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def start_server() -> subprocess.Popen:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            + [
                "--backend-store-uri",
                f"sqlite:///{workdir}/server.db",
                "--artifacts-destination",
                str(workdir / "art"),
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    return server
            except requests.ConnectionError:
                time.sleep(0.5)
        raise AssertionError("the MLflow server did not start")

    server = start_server()
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env["MLFLOW_TRACKING_URI"] = url
    fit = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "fit", "--config", str(QUICKSTART), "--trainer.max_epochs=4", *FAST]
        + ["--data.image_size=16", "--log_model=false"],  # epochs long enough for the outage to fall inside
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = mlflow_client(url)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert fit.poll() is None, fit.communicate()[1][-3000:]
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "val/acc"):
                break
            time.sleep(1)
        os.killpg(server.pid, 9)  # the tracking server goes away for 20 s in the middle of the fit
        server.wait()
        time.sleep(20)
        server = start_server()
        _, stderr = fit.communicate(timeout=600)
        assert fit.returncode == 0, stderr[-3000:]
        run = client.get_run(runs[0].info.run_id)
        assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
        for key in ("val/acc", "train/loss_epoch"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    finally:
        fit.kill()
        os.killpg(server.pid, 9)
