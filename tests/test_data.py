"""Data sources, splits, augmentation presets and bad-data handling."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import UserError
from cnnlab.cli import main
from cnnlab.data import POLICIES, PRESETS, DataModule, load_augment, preview, train_transform
from conftest import CIFAR10, QUICKSTART, cnnlab, make_image_folder, mlflow_client, only_run, write_shard


def labels_of(dm, split):
    return sorted(dm.splits[split].labels)


def test_image_folder_with_split_folders(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_image_folder(tmp_path / split, per_class=n)
    dm = DataModule(str(tmp_path), num_workers=0)
    assert dm.classes == ["cat", "dog"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 12, "val": 4, "test": 6}


def test_single_folder_split_is_stratified_and_fixed(tmp_path):
    make_image_folder(tmp_path, per_class=20)
    a = DataModule(str(tmp_path), val_fraction=0.25, test_fraction=0.25, num_workers=0)
    b = DataModule(str(tmp_path), val_fraction=0.25, test_fraction=0.25, num_workers=0)
    assert labels_of(a, "val") == [0] * 5 + [1] * 5 and labels_of(a, "test") == [0] * 5 + [1] * 5
    assert a.splits["val"].items == b.splits["val"].items
    assert not set(a.splits["train"].items) & set(a.splits["test"].items)


def test_csv_manifest_paths_relative_to_the_csv(tmp_path):
    make_image_folder(tmp_path / "images", per_class=10)
    rows = ["path,label"] + [f"images/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(10)]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    dm = DataModule(str(tmp_path / "m.csv"), val_fraction=0.2, test_fraction=0.2, num_workers=0)
    images, labels = next(iter(dm.loader("train")))
    assert dm.classes == ["cat", "dog"] and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)


def test_webdataset_shards(tmp_path):
    write_shard(tmp_path / "train-00000.tar.gz", 0, 8)
    write_shard(tmp_path / "test-00000.tar.gz", 100, 4)
    (tmp_path / "classes.txt").write_text("dark\nlight\n")
    dm = DataModule(str(tmp_path), val_fraction=0.25, num_workers=0, batch_size=4)
    assert dm.classes == ["dark", "light"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 2, "test": 4}
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3, 32, 32)


def test_streamed_shards_give_every_worker_an_equal_share_in_a_new_order_each_epoch(tmp_path):
    # 3 shards (one plain tar, which is skipped over by seeking) for 2 workers: fewer shards than readers
    # would still keep every worker busy, as each takes every n-th sample of every shard.
    for k, mode in enumerate(("w:gz", "w:gz", "w")):
        write_shard(tmp_path / (f"train-{k:05d}.tar" + (".gz" if mode == "w:gz" else "")), 40 * k, 40, mode)
    write_shard(tmp_path / "val-00000.tar.gz", 200, 10)
    dm = DataModule(str(tmp_path), batch_size=8, num_workers=2, stream=True, shuffle_buffer=16, test_fraction=0)
    in_memory = DataModule(str(tmp_path), num_workers=0, test_fraction=0)
    assert isinstance(dm.splits["train"].items[0], tuple)  # references, not bytes
    assert isinstance(dm.splits["val"].items[0], bytes)
    assert dm.describe() == in_memory.describe()  # same data, same fingerprint
    loader, epochs = dm.train_dataloader(), []
    assert len(loader) == 14  # 120 samples, 60 per worker, 56 of them in whole batches of 8
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(b[1]) == 8 for b in batches)
        seen = torch.cat([images[:, 0, 0, 0] for images, _ in batches]).tolist()
        labels = torch.cat([labels for _, labels in batches]).tolist()
        assert len(set(seen)) == len(seen) == 112 and set(seen) <= set(range(120))
        assert labels == [value % 2 for value in seen]
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0][:8] != sorted(epochs[0][:8])  # shuffled, and anew


@pytest.mark.skipif(not CIFAR10.exists(), reason="the shared CIFAR-10 shards are not on this machine")
@pytest.mark.slow
def test_cifar10_shards_read_whole_and_balanced():
    dm = DataModule(str(CIFAR10), num_workers=0)
    assert dm.classes[:2] == ["airplane", "automobile"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 45000, "val": 5000, "test": 10000}
    assert np.bincount(dm.splits["val"].labels).tolist() == [500] * 10


def test_digits_is_written_once_as_an_image_folder():
    dm = DataModule("digits", num_workers=0)
    assert dm.classes == [str(i) for i in range(10)] and sum(len(s) for s in dm.splits.values()) == 1797


@pytest.mark.parametrize("preset", [*PRESETS, *POLICIES])
@pytest.mark.parametrize("crop", ["short_side", "random_resized"])
def test_presets_and_crops_keep_the_size(preset, crop):
    transform = train_transform(preset, 32, crop=crop, random_erasing=0.5)
    for shape in ((8, 8, 3), (40, 60, 3)):
        out = transform(np.random.randint(0, 255, shape, np.uint8))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_random_resized_crop_takes_a_random_area_and_erasing_blanks_a_rectangle():
    image = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3)) * 4  # columns 0, 4, ..., 252
    crop = train_transform("none", 32, crop="random_resized", crop_scale=(0.1, 0.1), crop_ratio=(1.0, 1.0))
    for _ in range(5):
        out = crop(image)
        assert int(out[0, -1, 0]) - int(out[0, 0, 0]) < 4 * 64 * 0.5  # a third of the width (about 80 of 252)
    erase = train_transform("none", 32, random_erasing=1.0)
    assert (erase(np.full((32, 32, 3), 200, np.uint8)) == 0).any()


def test_bad_augment_names_the_key():
    with pytest.raises(UserError, match="data.augment='nope'"):
        load_augment("nope")


def test_preview_writes_a_png_grid(tmp_path, workdir):
    assert main(["data", "preview", "--config", str(QUICKSTART), "--out", str(tmp_path / "p.png")]) == 0
    assert Image.open(tmp_path / "p.png").size == (8 * 100, 4 * 114)
    dm = DataModule("digits", num_workers=0)
    assert preview(dm, tmp_path / "q.png", n=4).exists()


@pytest.fixture
def bad_folder(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("cat", "dog", "lynx"), per_class=4)
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(root / "cat" / "rgba.png")
    Image.new("CMYK", (20, 20)).save(root / "dog" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "dog" / "grey16.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "fake.jpg").write_text("<html>not an image</html>")
    full = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(full, "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(full.getvalue()[:200])
    Image.new("L", (400, 300)).save(root / "lynx" / "huge.png")
    return root


def test_data_check_reports_every_kind_of_bad_image(bad_folder, capsys):
    assert main(["data", "check", str(bad_folder), "--max-pixels", "100000"]) == 1
    out = capsys.readouterr().out
    assert "fake.jpg: not an image" in out and "truncated.jpg: unreadable or truncated" in out
    assert "huge.png: 400x300 is over data.max_pixels=100000" in out
    assert "1 CMYK" in out and "1 RGBA" in out and "1 16-bit grey" in out and "notes.txt" in out
    (bad_folder / "cat" / "fake.jpg").unlink()
    (bad_folder / "dog" / "truncated.jpg").unlink()
    assert main(["data", "check", str(bad_folder)]) == 0


def test_empty_class_folder_is_named(tmp_path, capsys):
    make_image_folder(tmp_path, per_class=3)
    (tmp_path / "lynx").mkdir()
    assert main(["data", "check", str(tmp_path)]) == 1
    assert "lynx: class folder with no images" in capsys.readouterr().out
    with pytest.raises(UserError, match="class folder with no images.*lynx.*Remove the folder"):
        DataModule(str(tmp_path))


def test_odd_modes_are_converted_to_rgb(bad_folder):
    dm = DataModule(str(bad_folder), val_fraction=0, test_fraction=0, num_workers=0)
    names = dm.splits["train"].items
    for name in ("rgba.png", "cmyk.jpg", "grey16.png"):
        image, _ = dm.dataset("train")[next(i for i, n in enumerate(names) if n.endswith(name))]
        assert image.shape == (3, 32, 32)
    grey16 = dm.dataset("train")[next(i for i, n in enumerate(names) if n.endswith("grey16.png"))][0]
    assert int(grey16.float().mean()) == 40000 >> 8  # scaled to 8 bits, not clipped to 255


FIT = [
    "fit",
    "--data.val_fraction=0",
    "--data.test_fraction=0",
    "--data.num_workers=0",
    "--data.batch_size=64",
    "--data.image_size=16",
    "--model.model=resnet18",
    "--trainer.max_epochs=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_training_on_a_bad_file_names_it(bad_folder, workdir):
    result = cnnlab(*FIT, f"--data.source={bad_folder}", cwd=workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "src/cat/fake.jpg: not an image" in result.stderr or "truncated.jpg" in result.stderr
    assert "data.on_bad_image: skip" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_skip_bad_images_counts_them_in_mlflow(bad_folder, workdir):
    result = cnnlab(
        *FIT, f"--data.source={bad_folder}", "--data.on_bad_image=skip", "--data.max_pixels=100000", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(mlflow_client())
    assert run.data.metrics["data/skipped_images"] == 3  # fake.jpg, truncated.jpg, huge.png


def test_device_augment_shifts_flips_and_cuts_out_each_image_on_its_own():
    from cnnlab.data import augment_on_device

    torch.manual_seed(0)
    images = torch.randint(1, 255, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment_on_device(images, "crop_flip")
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(8):  # each output is a shifted (zero-padded), maybe mirrored, window of its own input
        padded = torch.nn.functional.pad(images[i], (4, 4, 4, 4))
        windows = [padded[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert len({bool(torch.equal(out[i], images[i])) for i in range(64)}) == 2 or not torch.equal(out, images)
    cut = augment_on_device(images, "cifar")
    zero_squares = [(cut[i] == 0).all(0).sum().item() for i in range(64)]
    assert max(zero_squares) >= 16 * 16 - 64 and min(zero_squares) < 16 * 16  # half get a 16 px hole


@pytest.fixture
def imbalanced(workdir):
    """An ImageFolder of 16 `common` images and 4 `rare` ones."""
    root = make_image_folder(workdir / "imbalanced", classes=("common", "rare"), per_class=16, size=16)
    for path in sorted((root / "rare").iterdir())[4:]:
        path.unlink()
    return root


def test_data_check_reports_the_class_counts_and_the_imbalance(imbalanced, capsys):
    from cnnlab.cli import main

    assert main(["data", "check", str(imbalanced)]) == 0
    out = capsys.readouterr().out
    assert "class counts, fewest first: rare 4, common 16; imbalance ratio (largest / smallest) 4.0" in out
    assert "model.class_weights: balanced" in out


def test_the_balanced_sampler_draws_each_class_about_equally(imbalanced):
    data = DataModule(str(imbalanced), image_size=16, batch_size=4, num_workers=0, val_fraction=0, test_fraction=0)
    data.hparams.sampler = "balanced"
    drawn = torch.cat([labels for _ in range(20) for _, labels in data.train_dataloader()])
    assert len(drawn) == 20 * 20 and 0.4 < float((drawn == 1).float().mean()) < 0.6  # rare: 20% of the images


def test_balanced_class_weights_and_focal_loss(imbalanced):
    import lightning as L

    from cnnlab.module import ClassifierModule, FocalLoss

    data = DataModule(str(imbalanced), image_size=16, batch_size=4, num_workers=0, val_fraction=0, test_fraction=0)
    module = ClassifierModule(
        "resnet18", classes=data.classes, small_input=True, image_size=16, class_weights="balanced", loss="focal"
    )
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    assert module.loss.weight.tolist() == pytest.approx([20 / (2 * 16), 20 / (2 * 4)])  # sklearn's balanced rule
    logits, target = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    weight = torch.tensor([0.5, 2.0])
    plain, focal = FocalLoss(0.0), FocalLoss(2.0)
    plain.weight = focal.weight = weight
    assert plain(logits, target) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target, weight)))
    assert focal(logits, target) < plain(logits, target)
