"""Fine-tuning from trained weights, and predicting new images from a model URI."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback
from PIL import Image

from cnnlab import UserError
from cnnlab.callbacks import FreezeBackbone
from cnnlab.data import DataModule
from cnnlab.module import ClassifierModule
from cnnlab.pretrained import follow_weights
from conftest import QUICKSTART, cnnlab, cnnlab_here, make_image_folder


@pytest.fixture(scope="module")
def weights(quickstart, tmp_path_factory):
    """The network of the trained quick-start model as a plain state dict file, as users bring one."""
    cwd, _, run, _ = quickstart
    checkpoint = next(cwd.glob(f"mlruns/*/{run.info.run_id}/checkpoints/best.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    path = tmp_path_factory.mktemp("weights") / "digits-resnet18.pth"
    torch.save({"model": {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}}, path)
    return path


def test_weights_from_a_trained_model_load_with_a_new_head(weights):
    saved = torch.load(weights, weights_only=True)["model"]
    module = ClassifierModule("resnet18", num_classes=4, small_input=True, image_size=16, pretrained=str(weights))
    own = module.net.state_dict()
    assert module.new_layers == ["fc"] and own["fc.weight"].shape == (4, 512)
    assert all(torch.equal(saved[k], v) for k, v in own.items() if not k.startswith("fc."))


def test_a_registered_model_with_other_classes_gives_a_new_head(quickstart, workdir, monkeypatch):
    cwd, *_ = quickstart
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd}/mlruns/mlflow.db")
    classes = [f"c{i}" for i in range(10)]  # as many classes as digits, but other ones
    module = ClassifierModule(
        "resnet18", classes=classes, small_input=True, image_size=16, pretrained="models:/digits/1"
    )
    same = ClassifierModule("resnet18", num_classes=10, small_input=True, image_size=16, pretrained="models:/digits/1")
    assert module.new_layers == ["fc"] and same.new_layers == []
    assert torch.equal(module.net.layer4[1].conv2.weight, same.net.layer4[1].conv2.weight)
    assert not torch.equal(module.net.fc.weight, same.net.fc.weight)


def test_a_layer_that_does_not_fit_is_named_with_both_shapes(weights):
    with pytest.raises(UserError, match=r"layer conv1.weight is \(64, 3, 3, 3\) in the weights but \(64, 3, 7, 7\)"):
        ClassifierModule("resnet18", num_classes=10, image_size=32, pretrained=str(weights))
    with pytest.raises(UserError, match="lacks .* of model='resnet34'"):
        ClassifierModule("resnet34", num_classes=10, small_input=True, image_size=32, pretrained=str(weights))


def test_the_hub_offline_says_how_to_pass_a_file():
    with pytest.raises(UserError, match="not reachable here .* set model.pretrained to the local file"):
        ClassifierModule("resnet18", num_classes=10, image_size=32, pretrained=True)


class Snapshots(Callback):
    """Backbone weights, BN statistics and the head at the start and after every epoch."""

    def __init__(self):
        self.taken = []

    def take(self, module):
        return {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_train_start(self, trainer, module):
        self.taken.append(self.take(module))

    def on_train_epoch_end(self, trainer, module):
        self.taken.append(self.take(module))


def test_the_backbone_and_its_batchnorm_statistics_stay_frozen_then_train(weights, workdir):
    torch.manual_seed(0)
    module = ClassifierModule(
        "resnet18",
        num_classes=3,
        small_input=True,
        image_size=16,
        pretrained=str(weights),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    folder = make_image_folder(workdir / "images", classes=("a", "b", "c"), per_class=16, size=16)
    data = DataModule(str(folder), image_size=16, batch_size=16, num_workers=0, val_fraction=0, test_fraction=0)
    snapshots = Snapshots()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FreezeBackbone(epochs=1, backbone_lr=0.5), snapshots],
    )
    trainer.fit(module, datamodule=data)
    start, frozen, after = snapshots.taken
    backbone = [k for k in start if not k.startswith("fc.")]
    statistics = [k for k in backbone if "running_" in k]
    assert statistics and all(torch.equal(start[k], frozen[k]) for k in backbone)
    assert not torch.equal(start["fc.weight"], frozen["fc.weight"])
    assert all(not torch.equal(frozen[k], after[k]) for k in statistics)
    assert not torch.equal(frozen["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    lrs = sorted({group["lr"] for group in trainer.optimizers[0].param_groups})
    assert lrs == pytest.approx([0.025, 0.05])  # the pretrained layers at backbone_lr x the LR


def test_freezing_needs_pretrained_weights():
    module = ClassifierModule("resnet18", num_classes=3, small_input=True, image_size=16)
    with pytest.raises(UserError, match="model.pretrained is not set"):
        FreezeBackbone().setup(None, module, "fit")


def recipe(model: str, pretrained, **data) -> Namespace:
    return Namespace(
        model=Namespace(model=model, pretrained=pretrained, mean=None, std=None),
        data=Namespace(image_size=None, crop_pct=None, interpolation=None, **data),
    )


def test_preprocessing_follows_the_weights_unless_the_recipe_sets_it(weights):
    config = recipe("inception_v4", "weights.safetensors")
    follow_weights(config)
    assert config.model.mean == config.model.std == (0.5, 0.5, 0.5)  # timm's configuration, not ImageNet's
    assert (config.data.image_size, config.data.crop_pct, config.data.interpolation) == (299, 0.875, "bicubic")
    config = recipe("inception_v4", "weights.safetensors")
    config.model.mean, config.data.image_size = (0.485, 0.456, 0.406), 320
    with pytest.warns(UserWarning, match=r"model.mean=.*\(the weights': \(0.5, 0.5, 0.5\)\); data.image_size=320"):
        follow_weights(config)
    assert config.model.mean == (0.485, 0.456, 0.406) and config.model.std == (0.5, 0.5, 0.5)
    config = recipe("resnet18", str(weights))  # a cnnlab model's own configuration travels with it
    config.model.pretrained = None
    follow_weights(config)
    assert config.model.mean is None and config.data.image_size is None


def test_predict_classifies_a_folder_and_lists_what_it_skips(quickstart, workdir):
    import numpy as np

    cwd, *_ = quickstart
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlruns/mlflow.db"}
    from sklearn.datasets import load_digits

    digits = load_digits()
    photos = workdir / "photos"
    (photos / "more").mkdir(parents=True)
    for i in range(6):
        image = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(image).resize((16, 16)).save(photos / ("more" if i % 2 else "") / f"{i}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (photos / "notes.txt").write_text("not an image, not listed")
    result = cnnlab_here("predict", "models:/digits/1", "photos", "--top-k", "3", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(workdir / "predictions.csv")))
    assert len(rows) == 6 and list(rows[0]) == [
        "path",
        "label",
        "unsure",
        "label_1",
        "probability_1",
        "label_2",
        "probability_2",
        "label_3",
        "probability_3",
    ]
    correct = sum(row["label_1"] == str(digits.target[int(row["path"].rsplit("/", 1)[1][0])]) for row in rows)
    assert correct >= 5
    assert "1 skipped" in result.stderr and "broken.jpg" in result.stderr
    result = cnnlab_here(
        "predict", "models:/digits/1", "photos/**/*.png", "-o", "out.json", "--tta", "flip", cwd=workdir, env=env
    )
    report = json.loads((workdir / "out.json").read_text())
    assert result.returncode == 0 and len(report["predictions"]) == 6 and len(report["predictions"][0]["top"]) == 5
    (workdir / "list.csv").write_text("path\nphotos/0.png\nphotos/missing.png\n")
    result = cnnlab_here("predict", "models:/digits/1", "list.csv", "--output", "-", cwd=workdir, env=env)
    assert result.returncode == 0 and result.stdout.count("\n") == 2 and "missing.png" in result.stderr
    result = cnnlab_here("predict", "models:/digits/1", "nowhere/", cwd=workdir, env=env)
    assert result.returncode == 2 and "no images found in nowhere/" in result.stderr


@pytest.mark.slow
def test_one_command_fine_tunes_a_weights_file_on_an_image_folder_and_registers_it(weights, workdir):
    make_image_folder(workdir / "photos", classes=("ant", "bee", "wasp"), per_class=12, size=24)
    freeze = {"class_path": "cnnlab.callbacks.FreezeBackbone", "init_args": {"epochs": 1}}
    result = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--data.source=photos",
        f"--model.pretrained={weights}",
        "--trainer.max_epochs=2",
        f"--trainer.callbacks+={json.dumps(freeze)}",
        "--trainer.enable_progress_bar=false",
        "--register",
        "insects",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new, untrained: fc (the classifier for 3 classes)" in result.stderr + result.stdout
    assert "registered insects v1" in result.stdout
    result = cnnlab_here("predict", "models:/insects@challenger", "photos", cwd=workdir)
    rows = list(csv.DictReader(open(workdir / "predictions.csv")))
    assert result.returncode == 0 and len(rows) == 36 and {r["label_1"] for r in rows} <= {"ant", "bee", "wasp"}
