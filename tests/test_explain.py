"""Seeing inside: class-activation maps of a model's answers (`cnnlab explain`), and the confident-mistakes gallery
every fit logs."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICKSTART, cnnlab, cnnlab_here, mlflow_client, on_store, only_run


def test_the_default_layer_is_the_last_one_that_keeps_a_map():
    from cnnlab.cam import default_layer
    from cnnlab.models import create_model

    net = torch.nn.Sequential(create_model("resnet18", num_classes=3)).eval()
    forward = net.forward
    net.forward = lambda x: forward(x.float())
    assert default_layer(net, 224) == "0.layer4"  # 7 x 7 at 224 px
    assert default_layer(net, 32) == "0.layer3"  # layer4 is 1 x 1 at 32 px: the last map is a stage earlier


@pytest.mark.slow
def test_explain_writes_a_map_per_readable_image_and_lists_the_corrupt_one(quickstart, tmp_path):
    cwd = quickstart[0]
    images = tmp_path / "some" / "folder"
    images.mkdir(parents=True)
    for i, raw in enumerate(quickstart_samples(3)):
        (images / f"digit{i}.png").write_bytes(raw)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "cams"
    result = cnnlab_here("explain", "models:/digits/1", str(images), "--out", str(out), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "0000-digit0.png",
        "0001-digit1.png",
        "0002-digit2.png",
        "contact_sheet.png",
    ]
    assert "corrupt.png" in result.stderr and "1 skipped" in result.stderr
    assert Image.open(out / "0000-digit0.png").size[0] >= 224
    for wrong in (["--target", "eleven"], ["--layer", "net.nowhere"]):
        refused = cnnlab_here("explain", "models:/digits/1", str(images), "--out", str(out), *wrong, cwd=cwd)
        assert refused.returncode == 2 and wrong[1] in refused.stderr and "Traceback" not in refused.stderr


def quickstart_samples(n: int) -> list[bytes]:
    from cnnlab.data import DataModule

    split = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits["test"]
    return [split.raw(i * 37) for i in range(n)]


QUARTERS = [(0, 0), (0, 16), (16, 0), (16, 16)]


def region_folder(root: Path, per_class: int = 100) -> tuple[Path, dict]:
    """Noise, a patch of stripes in one quarter and a bright square in another: horizontal stripes make class
    `horizontal`, vertical ones `vertical`; the square is in every image, so only the stripes' region decides.
    Returns the folder and each file's stripes quarter."""
    rng, where = np.random.default_rng(0), {}
    for name in ("horizontal", "vertical"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            stripes, square = rng.permutation(4)[:2]
            y, x = np.array(QUARTERS[stripes]) + rng.integers(1, 6, 2)
            patch = np.zeros((10, 10), np.uint8)
            patch[::3] = 255
            image[y : y + 10, x : x + 10] = (patch if name == "horizontal" else patch.T)[..., None]
            y, x = np.array(QUARTERS[square]) + rng.integers(1, 6, 2)
            image[y : y + 10, x : x + 10] = 255
            path = root / name / f"{i:03d}.png"
            Image.fromarray(image).save(path)
            where[path] = QUARTERS[stripes]
    return root, where


@pytest.mark.slow
def test_the_map_of_a_class_decided_by_one_region_peaks_in_that_region(tmp_path, monkeypatch):
    from cnnlab import load
    from cnnlab.cam import default_layer, maps

    data, where = region_folder(tmp_path / "regions")
    fit = cnnlab(
        "fit", "--config", QUICKSTART, "--data.source", data, "--data.image_size", 32, "--trainer.max_epochs", 5,
        "--data.batch_size", 16, "--model.mistakes", 0, cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = only_run(mlflow_client(f"sqlite:///{tmp_path}/mlruns/mlflow.db"))
    on_store(monkeypatch, tmp_path)
    network = load.model(run.info.run_id, unflatten=True)
    module = network.module.eval()
    files = sorted(where)[::4]
    x = torch.from_numpy(
        np.stack([network.preprocess(np.asarray(Image.open(f).convert("RGB"))) for f in files]).transpose(0, 3, 1, 2)
    )
    heat = maps(
        module, default_layer(module, 32), x.contiguous(), [network.classes.index(f.parent.name) for f in files]
    )
    peaks = [np.unravel_index(h.argmax(), h.shape) for h in heat]
    inside = np.mean([(y // 16 * 16, x // 16 * 16) == where[f] for (y, x), f in zip(peaks, files)])
    assert inside >= 0.7, (inside, peaks)  # chance: a quarter; the bright square (a third of the rest) draws none


@pytest.mark.slow
def test_every_fit_logs_its_most_confident_mistakes_with_their_maps(quickstart, tmp_path, monkeypatch):
    _, client, run, _ = quickstart
    folder = Path(client.download_artifacts(run.info.run_id, "mistakes", str(tmp_path)))
    assert Image.open(folder / "confident_mistakes.png").size[0] > 400
    with open(folder / "confident_mistakes.csv") as f:
        rows = list(csv.DictReader(f))
    assert 0 < len(rows) <= 16
    assert all(r["label"] != r["predicted"] for r in rows)  # really wrong
    confidence = [float(r["probability"]) for r in rows]
    assert confidence == sorted(confidence, reverse=True)
    from cnnlab.data import DataModule

    split = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits["test"]
    for r in rows:  # each row names its test image and its true label
        assert split.name(int(r["index"])) == r["name"] and str(split.labels[int(r["index"])]) == r["label"]
    on_store(monkeypatch, quickstart[0])  # and the logged model does answer each one so
    from cnnlab import load

    network = load.model(f"runs:/{run.info.run_id}/model")
    answers = network.probabilities([split.raw(int(r["index"])) for r in rows])
    assert [network.classes[i] for i in answers.argmax(1)] == [r["predicted"] for r in rows]
    assert np.allclose(answers.max(1), confidence, atol=1e-4)
