"""The registered model is the product. cnnlab built as a wheel and installed into a fresh virtual environment
(only cnnlab comes from the wheel; the dependencies are the test runner's), used in a folder outside the
repository: fit a recipe on an ImageFolder, register and promote it, move the training data away, then serve
it, export it (ONNX fp32 without data, int8 with --data) and compare the variants."""

import json
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest
import requests

from cnnlab.sources import digits_folder
from conftest import ROOT, STORE_VARIABLES, serving

RECIPE = """\
seed_everything: 0
model:
  model: resnet18
  small_input: true
  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}}
  lr_scheduler: {class_path: cnnlab.schedules.OneCycle, init_args: {pct_start: 0.25}}
data: {source: imgs, image_size: 16, batch_size: 64, val_fraction: 0.15, test_fraction: 0.2, num_workers: 0}
trainer:
  max_epochs: 3
  enable_progress_bar: false
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(run(*args) in the outside folder with the wheel's cnnlab, that folder, the environment's bin/)."""
    import os

    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", ROOT],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("cnnlab-*.whl"))
    venv = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the installed dependencies
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            wheel,
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    outside = root / "project"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*STORE_VARIABLES, "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"

    def run(*args, **kwargs):
        return subprocess.run(
            [venv / "bin" / "cnnlab", *map(str, args)],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            **kwargs,
        )

    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import cnnlab, cnnlab.callbacks; print(cnnlab.__file__)"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's, not the repository's
    return run, outside, env, venv


@pytest.mark.slow
def test_the_lifecycle_from_a_wheel_with_the_training_data_gone(installed, tmp_path):
    run, outside, env, venv = installed
    shutil.copytree(digits_folder(), outside / "imgs")
    (outside / "recipe.yaml").write_text(RECIPE)
    fit = run("fit", "--config", "recipe.yaml", "--register", "digits")
    assert fit.returncode == 0, fit.stderr[-3000:]
    promote = run("promote", "digits")
    assert promote.returncode == 0 and "promoted" in promote.stdout, promote.stdout + promote.stderr

    moved = tmp_path / "elsewhere"
    shutil.move(outside / "imgs", moved)  # a serving machine never has the training set
    test_images = sorted((moved / "7").glob("*.png"))[:5]

    command = [venv / "bin" / "cnnlab", "serve", "models:/digits@champion"]
    with serving(command, outside, env, tmp_path / "serve.log", stop=signal.SIGTERM) as (url, _):
        labels = [
            requests.post(
                f"{url}/predict", data=path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=60
            ).json()["predictions"][0]["label"]
            for path in test_images
        ]
        assert labels.count("7") >= 4, labels
        info = requests.get(f"{url}/info", timeout=10).json()
    from conftest import mlflow_client

    version = mlflow_client(f"sqlite:///{outside}/mlruns/mlflow.db").get_model_version("digits", "1")
    assert info["sha256"] == version.tags["promotion.sha256"] and info["runtime"] == version.tags["promotion.runtime"]

    predict = run("predict", "models:/digits@champion", str(moved / "7"), "--format", "json", "-o", "sevens.json")
    predictions = json.loads((outside / "sevens.json").read_text())["predictions"]
    assert predict.returncode == 0 and len(predictions) == len(list((moved / "7").glob("*.png")))
    assert [p["top"][0]["label"] for p in predictions].count("7") >= 0.9 * len(predictions)

    fp32 = run("export", "models:/digits@champion", "--out", "fp32")  # no data needed
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    no_data = run("export", "models:/digits@champion", "--out", "int8", "--int8")
    assert no_data.returncode == 2 and "--data" in no_data.stderr and "Traceback" not in no_data.stderr, no_data.stderr
    int8 = run("export", "models:/digits@champion", "--out", "int8", "--int8", "--data", moved)
    assert int8.returncode == 0, int8.stderr[-3000:]
    report = run("compress", "report", "models:/digits@champion", "fp32", "int8", "--data", moved, "--runs", 3)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "(onnx-int8, onnxruntime)" in report.stdout and "(torch.export, onnxruntime)" in report.stdout
