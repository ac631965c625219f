"""Answers a user can trust: calibrated probabilities everywhere the model runs, "unsure" below a threshold, a
promotion gate that sees every class, and a registered version that reproduces."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from cnnlab.calibration import Reliability, confidence_curve, ece, fit_temperature, selective, threshold_for
from cnnlab.cnnlab_model import softmax
from cnnlab.evaluate import class_drops
from conftest import QUICKSTART, cnnlab, cnnlab_here, make_image_folder, mlflow_client, on_store, only_run


def test_the_temperature_undoes_overconfidence_and_the_ece_matches_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    overconfident = true_logits * 3  # a network whose logits are three times too large
    assert fit_temperature(overconfident, labels) == pytest.approx(3.0, rel=0.1)
    before, after = Reliability(), Reliability()
    before.update(overconfident, labels)
    after.update(overconfident / fit_temperature(overconfident, labels), labels)
    reference = multiclass_calibration_error(overconfident, labels, 10, n_bins=15, norm="l1")
    assert float(before.compute()) == pytest.approx(float(reference), abs=1e-4)
    assert ece(before.table()) == pytest.approx(float(before.compute()), abs=1e-6)
    assert float(after.compute()) < float(before.compute()) / 3


def test_the_threshold_for_a_precision_comes_from_the_recorded_curve():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.2, 0.0], [0.0, 0.3]])
    labels = torch.tensor([0, 1, 1, 0])  # the two unsure images are wrong
    meta = {"calibration": {"curve": confidence_curve(logits, labels)}}
    threshold, coverage, accuracy = threshold_for(meta, 0.99)
    assert 0.57 < threshold <= 0.98 and coverage == 0.5 and accuracy == 1.0
    assert selective(logits.numpy(), labels.numpy(), threshold) == (0.5, 1.0)
    with pytest.raises(ValueError, match="records no confidence curve"):
        threshold_for({}, 0.9)


def test_a_class_drop_counts_only_beyond_chance_on_that_class():
    labels = np.repeat(np.arange(3), 20)  # 20 images per class
    right = np.eye(3)[labels] * 5  # the reference gets every image right
    one_wrong = right.copy()
    one_wrong[0] = [0, 5, 0]  # class 0: one image of 20 lost (5 points: chance on 20 images)
    many_wrong = right.copy()
    many_wrong[20:30] = [5, 0, 0]  # class 1: half of its images lost
    assert class_drops(right, one_wrong, labels, ["a", "b", "c"], 0.0) == []
    drops = class_drops(right, many_wrong, labels, ["a", "b", "c"], 0.05)
    assert [(d["class"], d["reference"], d["other"], d["images"]) for d in drops] == [("b", 1.0, 0.5, 20)]


@pytest.mark.slow
def test_a_fit_logs_calibration_and_every_consumer_gives_the_same_calibrated_probabilities(
    quickstart, tmp_path, monkeypatch
):
    import mlflow
    import pandas as pd

    from cnnlab import load

    cwd, client, run, _ = quickstart
    on_store(monkeypatch, cwd)
    metrics = run.data.metrics
    assert metrics["test/ece"] < metrics["test/ece_uncalibrated"]
    assert metrics["calibration/ece_after"] < metrics["calibration/ece_before"]
    assert "plots/reliability.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    network = load.model(run.info.run_id)
    temperature = network.meta["temperature"]
    assert temperature == pytest.approx(metrics["calibration/temperature"], rel=1e-5) and temperature != 1.0
    images = [sample for sample, _ in network.samples[:6]]
    for i, raw in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(raw)
    # the checkpoint is the network before calibration: its logits / T are what every consumer must give
    checkpoint = Path(run.data.tags["cnnlab.checkpoint_dir"]) / "best.ckpt"
    expected = softmax(load.model(str(checkpoint)).logits(images) / temperature)
    pyfunc = mlflow.pyfunc.load_model(run.data.tags["cnnlab.model_uri"])
    probabilities = np.array(pyfunc.predict(pd.DataFrame({"image": images}))["probabilities"].tolist())
    assert np.allclose(probabilities, expected, atol=1e-5)
    result = cnnlab_here("predict", run.info.run_id, str(tmp_path), "-o", tmp_path / "p.json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    predicted = json.loads((tmp_path / "p.json").read_text())["predictions"]
    for row in predicted:
        top = row["top"][0]
        i = int(Path(row["path"]).stem)
        assert top["probability"] == pytest.approx(expected[i].max(), abs=1e-5)
        assert top["label"] == network.classes[expected[i].argmax()] == row["label"] and not row["unsure"]


@pytest.mark.slow
def test_predict_answers_unsure_below_min_confidence(quickstart, tmp_path, monkeypatch):
    from cnnlab import load

    cwd, _, run, _ = quickstart
    on_store(monkeypatch, cwd)
    network = load.model(run.info.run_id)
    images = [sample for sample, _ in network.samples]
    for i, raw in enumerate(images):
        (tmp_path / f"{i:02d}.png").write_bytes(raw)
    confidence = network.probabilities(images).max(1)
    low, high = sorted(set(confidence.round(5)))[:2]
    threshold = (low + high) / 2  # between the two least confident images
    args = ("predict", run.info.run_id, str(tmp_path), "--min-confidence", threshold, "-o", tmp_path / "p.csv")
    result = cnnlab_here(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    unsure = {int(Path(r["path"]).stem) for r in rows if r["unsure"] == "true"}
    assert unsure == {i for i, c in enumerate(confidence) if c < threshold} and unsure
    assert all(r["label"] == "" and r["label_1"] for r in rows if r["unsure"] == "true")
    assert all(r["label"] == r["label_1"] for r in rows if r["unsure"] == "false")
    wrong = cnnlab_here("predict", run.info.run_id, str(tmp_path), "--target-precision", "2", cwd=cwd)
    assert wrong.returncode == 2 and "--target-precision 2.0: give a probability from 0 to 1" in wrong.stderr


def scrambled_digits(folder: Path, broken: str = "3", into: str = "8") -> tuple[Path, Path]:
    """The quick start's digits split as PNG files with two manifests: clean, and one whose training images of
    class `broken` are all labelled `into` (val and test stay clean)."""
    from cnnlab.data import DataModule

    splits = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits
    rows = []
    for split, samples in splits.items():
        for i in range(len(samples)):
            path = folder / split / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(samples.raw(i))
            rows.append((str(path), str(samples.labels[i]), split))
    manifests = []
    for name, relabel in (("clean", {}), ("scrambled", {broken: into})):
        manifest = folder / f"{name}.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            for path, label, split in rows:
                writer.writerow([path, relabel.get(label, label) if split == "train" else label, split])
        manifests.append(manifest)
    return manifests[0], manifests[1]


@pytest.mark.slow
def test_the_gate_refuses_a_challenger_that_loses_one_class_and_names_it(quickstart, tmp_path):
    cwd, _, run, _ = quickstart
    clean, scrambled = scrambled_digits(tmp_path)
    assert cnnlab_here("register", run.info.run_id, "--name", "classgate", cwd=cwd).returncode == 0
    assert cnnlab_here("promote", "classgate", cwd=cwd).returncode == 0
    fit = cnnlab(
        "fit", "--config", QUICKSTART, f"--data.source={scrambled}", "--trainer.max_epochs=3",
        "--trainer.logger.init_args.experiment_name=classgate", "--register", "classgate", cwd=cwd,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    gate = cnnlab_here("promote", "classgate", "--min-delta", "-0.3", "--data", clean, cwd=cwd)
    assert gate.returncode == 1, gate.stdout
    assert "refused: v2 loses more than 0.05 of a class's recall" in gate.stdout
    assert "class 3 recall 1.000 -> 0.000" in gate.stdout or "class 3 recall 0.9" in gate.stdout
    client = quickstart[1]
    tags = client.get_model_version("classgate", "2").tags
    drops = json.loads(tags["promotion.class_drops"])
    assert tags["promotion.decision"] == "refused" and [d["class"] for d in drops] == ["3"]
    assert drops[0]["other"] < 0.2 and drops[0]["reference"] > 0.9
    assert str(client.get_model_version_by_alias("classgate", "champion").version) == "1"


@pytest.mark.slow
def test_a_version_reproduces_and_is_tagged(small, workdir):
    fit = cnnlab("fit", "--config", small, "--register", "again", cwd=workdir)  # the short quick start
    assert fit.returncode == 0, fit.stderr[-3000:]
    client = mlflow_client()
    run = only_run(client)
    result = cnnlab_here("reproduce", "models:/again/1", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    tags = client.get_model_version("again", "1").tags
    assert tags["reproduce.status"] in ("exact", "within") and "reproduced: again v1" in result.stdout
    assert abs(float(tags["reproduce.delta.test/acc"])) <= 0.01
    again = client.get_run(tags["reproduce.run_id"])
    assert again.data.tags["cnnlab.reproduces"] == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["sys.torch_threads"] == run.data.tags["sys.torch_threads"]


@pytest.mark.slow
def test_reproduce_refuses_in_one_line_when_the_data_changed(workdir):
    folder = make_image_folder(workdir / "photos", per_class=10, size=16)
    fit = cnnlab(
        "fit", "--config", QUICKSTART, f"--data.source={folder}", "--trainer.max_epochs=1", "--data.num_workers=0",
        cwd=workdir,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = only_run(mlflow_client())
    Image.new("RGB", (16, 16), "red").save(folder / "cat" / "new.png")
    result = cnnlab_here("reproduce", run.info.run_id, cwd=workdir)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is not the data the run trained on" in result.stderr and "images recorded" in result.stderr
    assert "reproduce.status" not in mlflow_client().get_run(run.info.run_id).data.tags


@pytest.mark.slow
def test_a_serving_worker_answers_unsure_below_its_min_confidence_flag(quickstart, monkeypatch):
    import base64

    from cnnlab.serve import Counters, ImageClassifierAPI

    cwd, _, run, _ = quickstart
    on_store(monkeypatch, cwd)
    api = ImageClassifierAPI(
        run.info.run_id, 10**7, 5.0, 0, str(cwd), Counters(1), 1, 8, 0.01, thresholds=(0.999999, None)
    )
    api.setup("cpu")  # what `cnnlab serve RUN --min-confidence 0.999999` runs in each worker
    images = [base64.b64encode(raw).decode() for raw, _ in api.current.samples]
    answer = api.encode_response(api.predict(api.decode_request({"images": images})))
    predictions = answer["predictions"]
    unsure = [p for p in predictions if p["unsure"]]
    assert unsure and all(p["label"] is None and p["probability"] < 0.999999 for p in unsure)
    assert all(p["label"] == p["top_k"][0]["label"] for p in predictions if not p["unsure"])
    own = api.decode_request({"images": images, "min_confidence": 0.0})  # a request's own threshold wins
    assert not any(p["unsure"] for p in api.encode_response(api.predict(own))["predictions"])
