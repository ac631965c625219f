"""Compression: distillation, pruning (unstructured and structured), ONNX and OpenVINO export (fp32, int8), other
runtimes for an exported model, the report."""

import base64
import hashlib
import json
import math
import os
import sys

import numpy as np
import pytest
import requests
import torch

from cnnlab import UserError, load
from cnnlab.callbacks.distillation import distillation_loss
from cnnlab.callbacks.pruning import Pruning
from cnnlab.cli import main
from cnnlab.module import ClassifierModule
from conftest import QUICKSTART, STORE_VARIABLES, cnnlab, cnnlab_here, mlflow_client, only_run, serving

FAST = ["--trainer.enable_progress_bar=false", "--data.num_workers=0", "--log_model=false"]


def test_distillation_loss_is_the_formula_on_fixed_logits():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[1.5, 1.0, -0.5], [-1.0, 0.0, 2.0]])
    hard, temperature, alpha = torch.tensor(0.7), 4.0, 0.9
    p_t = np.exp(teacher.numpy() / temperature)
    p_t /= p_t.sum(1, keepdims=True)
    p_s = np.exp(student.numpy() / temperature)
    p_s /= p_s.sum(1, keepdims=True)
    kl = float((p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean())
    expected = alpha * temperature**2 * kl + (1 - alpha) * 0.7
    assert float(distillation_loss(student, teacher, hard, temperature, alpha)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, hard, temperature, 1.0)) == pytest.approx(0.0, abs=1e-6)


def quickstart_checkpoint(quickstart):
    cwd, _, run, _ = quickstart
    return next(cwd.glob(f"mlruns/*/{run.info.run_id}/checkpoints/best.ckpt"))


@pytest.mark.slow
def test_a_student_learns_from_the_teacher_alone(quickstart, workdir):
    teacher = quickstart_checkpoint(quickstart)
    callbacks = [
        {
            "class_path": "cnnlab.callbacks.Distillation",
            "init_args": {"teacher": str(teacher), "temperature": 4.0, "alpha": 1.0},
        }
    ]  # no label term
    result = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=3",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--model.label_smoothing=0",
        *FAST,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(mlflow_client())
    assert run.data.metrics["test/acc"] > 0.8 and "train/distill_loss" in run.data.metrics
    state = torch.load(next(workdir.glob("mlruns/*/*/checkpoints/best.ckpt")), weights_only=False)["state_dict"]
    assert all(k.startswith("net.") for k in state)  # the student alone


@pytest.mark.slow
def test_unstructured_pruning_follows_its_schedule_and_spares_norms_and_biases(workdir):
    callbacks = [
        {"class_path": "cnnlab.callbacks.Pruning", "init_args": {"amount": 0.6, "start_epoch": 0, "end_epoch": 1}}
    ]
    result = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=3",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *FAST,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client()
    run = only_run(client)
    schedule = Pruning(amount=0.6, start_epoch=0, end_epoch=1)
    logged = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "prune/sparsity"), key=lambda m: m.step)
    ]
    assert logged == pytest.approx([schedule.target(0), 0.6, 0.6], abs=1e-3)
    assert (
        run.data.metrics["prune/params"] < 0.5 * 11.2e6
        and run.data.metrics["prune/gflops_effective"] < run.data.metrics["prune/gflops"]
    )
    state = torch.load(next(workdir.glob("mlruns/*/*/checkpoints/best.ckpt")), weights_only=False)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)  # permanent: plain dense tensors
    convs = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    assert sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs) == pytest.approx(0.6, abs=1e-3)
    norms_and_biases = [v for k, v in state.items() if v.ndim == 1 and v.is_floating_point() and "running" not in k]
    assert norms_and_biases and all(int((v == 0).sum()) == 0 for v in norms_and_biases)


def test_pretrained_starts_from_a_trained_model(quickstart):
    checkpoint = quickstart_checkpoint(quickstart)
    module = ClassifierModule("resnet18", num_classes=10, small_input=True, image_size=16, pretrained=str(checkpoint))
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items() if k.startswith("net."))


@pytest.mark.slow
def test_structured_pruning_makes_a_smaller_network_with_the_same_outputs(quickstart, workdir):
    callbacks = [
        {"class_path": "cnnlab.callbacks.Pruning", "init_args": {"mode": "structured", "amount": 0.5, "scope": "layer"}}
    ]
    result = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=2",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--model.pretrained={quickstart_checkpoint(quickstart)}",
        "--model.optimizer.init_args.lr=0.02",
        *FAST,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = ClassifierModule.load_from_checkpoint(
        next(workdir.glob("mlruns/*/*/checkpoints/best.ckpt")), map_location="cpu"
    ).eval()
    full = ClassifierModule("resnet18", num_classes=10, small_input=True, image_size=16)
    params = sum(p.numel() for p in pruned.parameters())
    assert params < 0.4 * sum(p.numel() for p in full.parameters())
    assert pruned(torch.zeros(3, 3, 16, 16, dtype=torch.uint8)).shape == (3, 10)
    run = only_run(mlflow_client())
    assert run.data.metrics["test/acc"] > 0.8  # fine-tuned after losing half its channels
    assert run.data.metrics["prune/params"] == params


@pytest.fixture(scope="module")
def exports(quickstart, tmp_path_factory):
    cwd = quickstart[0]
    folder = tmp_path_factory.mktemp("exports")
    for name, args in (
        ("fp32", []),
        ("int8", ["--int8", "--register", "digits-int8"]),
        ("openvino", ["--format", "openvino"]),
        ("openvino-int8", ["--format", "openvino", "--int8", "--register", "digits-openvino-int8"]),
    ):
        result = cnnlab_here("export", "models:/digits/1", "--out", folder / name, *args, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
    return cwd, folder


def meta_of(folder):
    return json.loads(next(folder.glob("**/cnnlab.json")).read_text())


@pytest.mark.slow
def test_onnx_export_is_a_cnnlab_model_that_agrees_with_torch(exports, quickstart):
    cwd, folder = exports
    meta = meta_of(folder / "fp32")
    assert meta["runtime"] == "onnx" and meta["classes"] == [str(i) for i in range(10)] and meta["schema"] == 2
    assert meta["checks"]["max_abs_diff"] < 1e-3 and meta["checks"]["top1_agreement"] == 1.0
    assert meta["checks"]["images"] == 16 and meta["source"]["uri"] == "models:/digits/1"  # its own samples, no data
    source, exported = load.model(str(quickstart_checkpoint(quickstart))), load.model(str(folder / "fp32"))
    temperature = meta["temperature"]  # inherited: the exported network divides by it, as its source's did
    assert temperature == pytest.approx(quickstart[2].data.metrics["calibration/temperature"], rel=1e-5) != 1.0
    for batch in (1, 7):  # the batch axis is dynamic; the checkpoint is the network before calibration
        x = np.random.default_rng(batch).integers(0, 256, (batch, 3, 16, 16), dtype=np.uint8)
        assert np.abs(exported.predict(x) - source.predict(x) / temperature).max() < 1e-3


def test_int8_loads_and_agrees_with_fp32_on_95_percent_of_digits(exports):
    cwd, folder = exports
    meta = meta_of(folder / "int8")
    assert meta["format"] == "onnx-int8" and meta["checks"]["top1_agreement"] >= 0.95
    assert meta["checks"]["images"] == 359  # the test split of the data the model records
    assert meta["bytes"] < 0.3 * meta_of(folder / "fp32")["bytes"]
    version = mlflow_client(f"sqlite:///{cwd}/mlruns/mlflow.db").get_model_version("digits-int8", "1")
    assert version.tags["variant"] == "onnx-int8" and float(version.tags["export/top1_agreement"]) >= 0.95
    digest = hashlib.sha256(next((folder / "int8").glob("**/cnnlab.json")).read_bytes()).hexdigest()
    assert version.tags["cnnlab.source_version"] == "digits/1" and version.tags["cnnlab.sha256"] == digest


def on_store(monkeypatch, cwd):
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(variable, f"sqlite:///{cwd}/mlruns/mlflow.db")


def test_openvino_exports_fp32_and_int8_agree_with_torch(exports, quickstart, monkeypatch):
    cwd, folder = exports
    on_store(monkeypatch, cwd)
    fp32, int8 = meta_of(folder / "openvino"), meta_of(folder / "openvino-int8")
    assert fp32["runtime"] == int8["runtime"] == "openvino" and int8["format"] == "openvino-int8"
    assert fp32["checks"]["max_abs_diff"] < 1e-3 and fp32["checks"]["top1_agreement"] == 1.0
    assert int8["checks"]["images"] == 359 and int8["checks"]["top1_agreement"] >= 0.95
    assert int8["bytes"] < 0.4 * fp32["bytes"]  # the .xml and the .bin of the weights
    source, exported = load.model(str(quickstart_checkpoint(quickstart))), load.model("models:/digits-openvino-int8/1")
    assert exported.engine == "openvino" and exported.version == "1"
    for batch in (1, 7):  # the batch axis is dynamic
        x = np.random.default_rng(batch).integers(0, 256, (batch, 3, 16, 16), dtype=np.uint8)
        assert exported.predict(x).shape == source.predict(x).shape == (batch, 10)


def test_an_onnx_model_runs_on_openvino_or_cuda_and_an_openvino_one_says_why_not(exports, monkeypatch, capsys):
    cwd, folder = exports
    on_store(monkeypatch, cwd)
    ort, ov = load.model(str(folder / "fp32")), load.model(str(folder / "fp32"), runtime="openvino")
    assert (ort.engine, ov.engine) == ("onnxruntime", "openvino")
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    assert np.abs(ort.predict(x) - ov.predict(x)).max() < 1e-3
    import onnxruntime

    cuda = load.model(str(folder / "fp32"), device="cuda")  # CUDA / TensorRT providers where installed
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "has no working CUDA or TensorRT provider here" in capsys.readouterr().err
    assert np.abs(cuda.predict(x) - ort.predict(x)).max() < 1e-2
    fit = load.model("models:/digits/1", runtime="openvino")  # a fit's model: its ONNX twin
    assert fit.engine == "openvino" and np.abs(fit.predict(x) - load.model("models:/digits/1").predict(x)).max() < 1e-3
    with pytest.raises(UserError, match="a openvino network cannot run on onnxruntime: export it"):
        load.model(str(folder / "openvino"), runtime="onnxruntime")


@pytest.mark.slow
def test_serve_runs_an_onnx_model_on_openvino(exports):
    cwd, folder = exports
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    command = [sys.executable, "-m", "cnnlab", "serve", str(folder / "fp32"), "--runtime", "openvino"]
    with serving(command, cwd, env, cwd / "serve-openvino.log", seconds=120) as (url, _):
        offline = load.model(str(folder / "fp32"))
        images = [raw for raw, _ in offline.samples]
        served = requests.post(
            f"{url}/predict", json={"images": [base64.b64encode(i).decode() for i in images]}, timeout=60
        )
        assert served.status_code == 200, served.text
        expected = [offline.classes[i] for i in offline.logits(images).argmax(1)]
        assert [p["label"] for p in served.json()["predictions"]] == expected
        info = requests.get(f"{url}/info", timeout=10).json()
        assert info["runtime"] == "onnx" and info["engine"] == "openvino"


@pytest.mark.slow
def test_compress_report_prints_and_logs_the_table(exports):
    cwd, folder = exports
    variants = [folder / name for name in ("fp32", "int8", "openvino", "openvino-int8")]
    result = cnnlab_here("compress", "report", "models:/digits/1", *variants, "--runs", 5, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("models:/", "fp32", "int8", "openvino"))]
    assert len(rows) == 5 and "(onnx-int8, onnxruntime)" in rows[2] and "(openvino-int8, openvino)" in rows[4]
    for row in rows[1:]:
        agreement, drop = float(row.split()[-2]), float(row.split()[-1])
        assert agreement >= 0.95 and math.isfinite(drop) and abs(drop) <= 5.0
    client = mlflow_client(f"sqlite:///{cwd}/mlruns/mlflow.db")
    report = client.search_runs(
        [client.get_experiment_by_name("cnnlab").experiment_id], "tags.`cnnlab.role` = 'compress-report'"
    )
    assert report and "variant4/agreement" in report[0].data.metrics


@pytest.mark.slow
def test_export_explains_a_bad_model_uri(workdir, capsys):
    assert main(["export", "models:/nope/1", "--out", str(workdir / "x")]) == 2
    assert "'models:/nope/1' is not a model in" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_report_converts_for_every_runtime_installed(quickstart):
    cwd = quickstart[0]
    result = cnnlab_here("compress", "report", "models:/digits/1", "--all-runtimes", "--runs", 3, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("models:/", "-> "))]
    engines = ["torch.export, onnxruntime", "torch.export, torch", "onnx, onnxruntime", "onnx-int8, onnxruntime"]
    engines += ["openvino, openvino", "openvino-int8, openvino"]  # the fit's model served (its twin), its program
    assert len(rows) == 6 and all(f"({engine})" in row for engine, row in zip(engines, rows)), rows
    assert all(float(row.split()[-2]) >= 0.95 for row in rows)  # agreement with the torch model


def test_predict_runs_an_onnx_model_on_openvino_with_the_same_answers(exports, tmp_path):
    cwd, folder = exports
    for i, (raw, _) in enumerate(load.model(str(folder / "fp32")).samples):
        (tmp_path / f"{i:02d}.png").write_bytes(raw)
    answers = {}
    for runtime in ([], ["--runtime", "openvino"]):
        out = tmp_path / f"{len(runtime)}.csv"
        result = cnnlab_here("predict", folder / "fp32", tmp_path, "-o", out, *runtime, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        answers[len(runtime)] = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    assert len(answers[0]) == 16 and answers[0] == answers[2]
