"""The DataModule: any source, split once with a fixed seed, augmented by albumentations, batched as uint8.

Batches stay uint8 (N, 3, H, W) until they reach the device; the model normalizes them there, which
keeps host-to-device copies four times smaller and the logged model self-contained.
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import random
import warnings
from functools import partial
from pathlib import Path
from typing import Literal

import albumentations as A
import lightning as L
import torch
from PIL import Image
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    WeightedRandomSampler,
    default_collate,
    get_worker_info,
)

from cnnlab import UserError
from cnnlab.cnnlab_model import INTERPOLATIONS, center_crop, default_crop_pct
from cnnlab.sources import (
    BadImageError,
    Fetch,
    Samples,
    ShardError,
    fold_splits,
    load_members,
    open_image,
    read_members,
    read_source,
    resolve_path,
    source_root,
    stratified_split,
    synthetic_image,
)

PRESETS = ("none", "flip", "light", "standard", "strong", "cifar")
# torchvision's automatic policies (transforms.v2 class names), applied after a flip
POLICIES = {"randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide", "augmix": "AugMix"}
DEFAULT_IMAGE_SIZE = 32
# Lightning's warning about an IterableDataset with __len__ under several workers: ShardStream gives each
# worker its own share and counts exactly what they yield.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def load_augment(augment: str) -> A.BasicTransform:
    """A preset name (shipped in the package; copies in recipes/augment/) or the path of an
    albumentations-serialized YAML."""
    from importlib.resources import as_file, files

    if augment in PRESETS:
        with as_file(files("cnnlab") / "presets" / "augment" / f"{augment}.yaml") as path:
            return A.load(str(path), data_format="yaml")
    path = resolve_path(augment)
    if not path.exists():
        raise UserError(
            f"data.augment='{augment}' is neither a preset ({', '.join((*PRESETS, *POLICIES))}) nor an existing file. "
            "Copy a preset from recipes/augment/ and point data.augment at it."
        )
    try:
        return A.load(str(path), data_format="yaml")
    except Exception as err:
        raise UserError(
            f"data.augment='{augment}': {path} is not an albumentations pipeline ({err}). "
            "Write it with albumentations.save(transform, path, data_format='yaml')."
        ) from None


def train_transform(
    augment: str,
    image_size: int,
    interpolation: str | None = None,
    crop: str = "short_side",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    random_erasing: float = 0.0,
):
    """The training crop (short side to image_size and a random square of it, or a random-resized crop), then
    the preset (which keeps the size): an albumentations pipeline, or a flip and one of torchvision's
    automatic policies on the uint8 tensor; then random erasing."""
    resize = INTERPOLATIONS[interpolation or "bilinear"]
    if crop == "random_resized":
        cut = [
            A.RandomResizedCrop((image_size, image_size), crop_scale, crop_ratio, resize, area_for_downscale="image")
        ]
    else:
        cut = [
            A.SmallestMaxSize(max_size=image_size, interpolation=resize, area_for_downscale="image"),
            A.RandomCrop(image_size, image_size),
        ]
    policy = None
    if augment in POLICIES:
        from torchvision.transforms import v2

        policy = getattr(v2, POLICIES[augment])()
        cut.append(A.HorizontalFlip(p=0.5))
    else:
        cut.append(load_augment(augment))
    if random_erasing:
        from torchvision.transforms import v2

        erase = v2.RandomErasing(p=random_erasing)
        policy = v2.Compose([policy, erase]) if policy else erase
    return partial(_apply, A.Compose(cut), policy)


def _apply(pipeline: A.Compose, policy, image):
    image = pipeline(image=image)["image"]
    if policy is None:
        return image
    return policy(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()


def eval_transform(image_size: int, crop_pct: float, interpolation: str | None = None):
    """The logged model's own preprocessing, so evaluation here and predictions there see the same pixels."""
    return partial(center_crop, size=image_size, crop_pct=crop_pct, interpolation=interpolation)


class ImageDataset(Dataset):
    """Decodes and augments one sample; a bad image raises (naming the file) or is skipped and counted."""

    def __init__(self, samples: Samples, transform, image_size: int, max_pixels: int, skip_bad: bool):
        self.samples, self.transform, self.image_size = samples, transform, image_size
        self.max_pixels, self.skip_bad = max_pixels, skip_bad
        # Shared with the loader workers (forked), so the main process can count what they skipped.
        self.bad = multiprocessing.Array(ctypes.c_bool, len(samples), lock=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.decode(self.samples.items[i], i)

    def decode(self, item, i: int):
        if isinstance(item, int):
            image = synthetic_image(item, self.image_size)
        else:
            try:
                image, _ = open_image(item, self.max_pixels)
            except BadImageError as err:
                if not self.skip_bad:
                    raise BadImageError(
                        f"{self.samples.name(i)}: {err}. Fix or remove the file, check the source "
                        "with `cnnlab data check`, or set data.on_bad_image: skip."
                    ) from None
                self.bad[i] = True
                return None
        image = self.transform(image)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), self.samples.labels[i]


class ShardStream(IterableDataset):
    """The training split of WebDataset shards, read as a stream: memory stays flat whatever the data size.

    Each epoch every reader (loader worker, on every rank) walks the shards in the same new order and
    takes every n-th sample, so all workers are busy however few the shards are; a buffer of encoded
    samples shuffles across shards. Every reader yields the same number of samples, a multiple of the
    batch size, so every rank runs the same number of steps.
    """

    def __init__(self, images: ImageDataset, batch_size: int, buffer: int, seed: int, fetch: Fetch = Fetch()):
        self.images, self.batch_size, self.buffer, self.seed = images, batch_size, buffer, seed
        self.fetch = fetch
        self.bad = images.bad  # what DataModule.skipped counts
        self.by_shard: dict[str, dict[str, int]] = {}
        for i, (shard, member) in enumerate(images.samples.items):
            self.by_shard.setdefault(shard, {})[member] = i
        self.workers, self.world, self.epoch = 1, 1, 0

    def quota(self) -> int:
        """Samples per reader and epoch."""
        share = len(self.images) // (self.workers * self.world)
        return share // self.batch_size * self.batch_size or share

    def __len__(self) -> int:  # per rank, as Lightning counts steps
        return self.quota() * self.workers

    def __iter__(self):
        info = get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        me, readers = rank * self.workers + (info.id if info else 0), self.workers * self.world
        self.epoch += 1  # every reader holds its own copy, and counts its epochs alike
        rng = random.Random(self.seed * 100_003 + self.epoch)
        shards = list(self.by_shard)
        rng.shuffle(shards)
        yield from itertools.islice(self._passes(shards, me, readers, rng), self.quota())

    def _passes(self, shards: list[str], me: int, readers: int, rng: random.Random):
        """Decoded samples of this reader's share, walked again while skipped images or shards leave it short of
        its quota (every reader must yield the quota, or the ranks would run different numbers of steps)."""
        while True:
            encoded = self._share(shards, me, readers)
            yielded = 0
            for data, i in self._shuffle(encoded, random.Random(rng.random() + me)):
                if (sample := self.images.decode(data, i)) is not None:
                    yielded += 1
                    yield sample
            if not yielded:
                return

    def _share(self, shards: list[str], me: int, readers: int):
        """(encoded image, sample index) of every readers-th sample across the shards, from the me-th on."""
        ordinal = 0
        for shard in shards:
            members = self.by_shard[shard]
            mine = {name: i for k, (name, i) in enumerate(members.items()) if (ordinal + k) % readers == me}
            ordinal += len(members)
            read = set()
            try:
                for name, data in read_members(shard, mine, self.fetch):
                    read.add(name)
                    yield data, mine[name]
            except ShardError as err:
                if not self.images.skip_bad:
                    raise
                warnings.warn(f"left out {err}", stacklevel=2)
                for name in mine.keys() - read:  # counted with the skipped images
                    self.bad[mine[name]] = True

    def _shuffle(self, items, rng: random.Random):
        """A shuffle buffer: hold `buffer` items, hand out a random one for each that comes in."""
        buffer = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.buffer:
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


def collate(batch):
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


class DataModule(L.LightningDataModule):
    """Image classification data from any source.

    Args:
        source: ImageFolder root (with train/ val/ test/, or one folder that is split), CSV manifest
            (path,label[,split]), folder of WebDataset shards, `digits` or `synthetic`.
        augment: preset name (none, flip, light, standard, strong, cifar), path of an albumentations YAML, or one of
            torchvision's automatic policies after a horizontal flip: randaugment, trivialaugment, augmix.
        crop, crop_scale, crop_ratio: the training crop: `short_side` (the short side to image_size, then a
            random square) or `random_resized` (a random area `crop_scale` of the image at an aspect ratio in
            `crop_ratio`, resized to image_size: the ImageNet references' RandomResizedCrop).
        random_erasing: the probability of erasing a random rectangle of a training image (torchvision's).
        val_fraction, test_fraction: split off the training data (stratified) where the source has no such split.
        on_bad_image: `error` stops on a bad image and names it; `skip` skips it and counts it.
        image_size, crop_pct, interpolation: images are resized (short side to image_size / crop_pct at
            evaluation, area filter when shrinking, `interpolation` when enlarging) and cropped square. Unset,
            what model.pretrained's weights expect, else 32 px, whole (crop_pct 1) below 64 px, bilinear.
        device_augment: augment training batches on the device, after the copy, instead of in the loader
            workers: `flip`, `crop_flip` (pad-4 random crop and flip) or `cifar` (crop_flip and a cutout of
            half the side). It pays where the CPU is the bottleneck and the ops are cheap (CIFAR on a GPU).
        stream: read the training images of WebDataset shards as a stream (see ShardStream) instead of
            into memory, for data sets larger than memory; val and test are still read into memory.
        retries, timeout: a remote shard that fails (an HTTP error, a broken connection, no answer for `timeout`
            seconds) is read again `retries` times, after 1, 2, 4 ... s, from where it broke off; then the fit
            stops naming it, or with on_bad_image: skip it is left out and its images counted as skipped.
        shuffle_buffer: encoded samples each loader worker holds to shuffle a stream.
        sampler: `balanced` draws training images with replacement, each class equally often on average
            (torch's WeightedRandomSampler; under DDP Lightning shares it out among the ranks). For imbalanced
            data; see also model.class_weights.
        fold: `k/K`, cross-validation fold k of K: the train and val images pooled and dealt per class into K
            folds (split_seed); fold k is the val split, the others the train split, test stays (the fits of
            `cnnlab data audit`).
        tta: linked from model.tta: with `ten_crop`, test images are resized to image_size / crop_pct and
            kept whole, for the model to cut its ten crops from.
    """

    def __init__(
        self,
        source: str = "digits",
        augment: str = "none",
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        on_bad_image: Literal["error", "skip"] = "error",
        max_pixels: int = Image.MAX_IMAGE_PIXELS,  # PIL's decompression-bomb limit
        crop_pct: float | None = None,
        interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None,
        synthetic_size: int = 2048,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        device_augment: Literal["flip", "crop_flip", "cifar"] | None = None,
        stream: bool = False,
        shuffle_buffer: int = 1000,
        sampler: Literal["balanced"] | None = None,
        tta: Literal["flip", "ten_crop"] | None = None,
        crop: Literal["short_side", "random_resized"] = "short_side",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        random_erasing: float = 0.0,
        retries: int = 3,
        timeout: float = 60.0,
        fold: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise UserError(f"data.{key}={value} must be in [0, 1).")
        if val_fraction + test_fraction >= 1:
            raise UserError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
                "training data. Lower them."
            )
        image_size = image_size or DEFAULT_IMAGE_SIZE
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.crop_pct, self.interpolation = crop_pct or default_crop_pct(image_size), interpolation
        # built now, so a bad preset fails here and not in a loader worker
        self.train_tf = train_transform(
            augment, image_size, interpolation, crop, crop_scale, crop_ratio, random_erasing
        )
        self.fetch = Fetch(retries, timeout)
        self.left_out: list[str] = []  # shards skipped under on_bad_image: skip
        self.classes, found = read_source(
            source, synthetic_size, stream, self.fetch, self.left_out if on_bad_image == "skip" else None
        )
        fractions = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in found}
        base = found.get("train", found.get("all"))
        splits = {
            **stratified_split(base, fractions, split_seed),
            **{s: found[s] for s in ("val", "test") if s in found},
        }
        self.splits = {
            name: samples if name == "train" else load_members(samples, self.fetch)
            for name, samples in splits.items()
            if len(samples) or name == "train"
        }
        if fold:
            k, folds = parse_fold(fold)
            if stream:
                raise UserError("data.fold: cross-validation reads every image into memory: set data.stream: false.")
            self.splits = fold_splits(self.splits, k, folds, split_seed)
        self.datasets: dict[str, ImageDataset | ShardStream] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str) -> ImageDataset:
        if split not in self.datasets:
            if split not in self.splits or not len(self.splits[split]):
                raise UserError(
                    f"data.source='{self.source}' has no {split} split. Add a {split}/ folder or "
                    f"set data.{split}_fraction above 0."
                )
            if split == "train":
                transform = self.train_tf
            elif split == "test" and self.hparams.tta == "ten_crop":  # the model cuts the crops
                transform = eval_transform(round(self.image_size / self.crop_pct), 1.0, self.interpolation)
            else:
                transform = eval_transform(self.image_size, self.crop_pct, self.interpolation)
            samples = self.splits[split]
            self.datasets[split] = ImageDataset(
                samples, transform, self.image_size, self.hparams.max_pixels, self.hparams.on_bad_image == "skip"
            )
            if samples.items and isinstance(samples.items[0], tuple):
                self.datasets[split] = ShardStream(
                    self.datasets[split],
                    self.batch_size,
                    self.hparams.shuffle_buffer,
                    self.hparams.split_seed,
                    self.fetch,
                )
        return self.datasets[split]

    def describe(self) -> dict:
        """Dataset fingerprint for tracking: a hash of every split's file list, split sizes, class counts."""
        root = source_root(self.source)
        counts = [0] * len(self.classes)
        for samples in self.splits.values():
            for label in samples.labels:
                counts[label] += 1
        return {
            "fingerprint": "-".join(self.splits[s].fingerprint(root) for s in sorted(self.splits)),
            "sizes": {s: len(v) for s, v in self.splits.items()},
            "class_counts": dict(zip(self.classes, counts)),
            "root": root,
            **({"left_out_shards": self.left_out} if self.left_out else {}),
        }

    @property
    def skipped(self) -> int:
        """Distinct bad images skipped so far, in every split."""
        return sum(sum(ds.bad) for ds in self.datasets.values())

    def workers(self) -> int:
        if self.hparams.num_workers is not None:
            return self.hparams.num_workers
        world = self.trainer.world_size if self.trainer else 1
        return max(1, min(16, len(os.sched_getaffinity(0)) // world))

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset, workers = self.dataset(split), self.workers()
        persistent, sampler = self.hparams.persistent_workers, None
        if isinstance(dataset, ShardStream):  # it shuffles itself, and its workers must count the epochs
            if self.hparams.sampler:
                raise UserError("data.sampler: a streamed source draws its own order: set data.stream: false.")
            dataset.workers, dataset.world = max(1, workers), self.trainer.world_size if self.trainer else 1
            shuffle, persistent = False, True
        elif shuffle and self.hparams.sampler == "balanced":
            labels = torch.tensor(self.splits[split].labels)
            per_class = torch.bincount(labels, minlength=self.num_classes).clamp(min=1)
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            sampler = WeightedRandomSampler(1.0 / per_class[labels], len(labels), generator=generator)
            shuffle = False
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=(shuffle or sampler is not None) and len(dataset) > self.batch_size,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=persistent and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        mode = self.hparams.device_augment
        if mode and batch is not None and self.trainer is not None and self.trainer.training:
            batch = (augment_on_device(batch[0], mode), batch[1])
        return batch


def limited(loader, limit: int | float):
    """The batches of a loader that Lightning's `limit_*_batches` lets its loop run: an int that many, a fraction
    that share; so the passes made beside the loops (calibration, the mistakes gallery) take no more."""
    if isinstance(limit, float) and limit >= 1.0:
        return iter(loader)
    if isinstance(limit, float):
        limit = max(1, int(len(loader) * limit))
    return itertools.islice(loader, limit)


def parse_fold(fold: str) -> tuple[int, int]:
    """`k/K` as (k, K), 1 <= k <= K, K >= 2."""
    k, _, folds = str(fold).partition("/")
    if not (k.isdigit() and folds.isdigit() and 1 <= int(k) <= int(folds) and int(folds) >= 2):
        raise UserError(f"data.fold='{fold}' must be k/K: fold k (from 1) of K >= 2 folds, e.g. 1/5.")
    return int(k), int(folds)


def labelled(meta: dict, data: str | None, splits: tuple[str, ...] = ("test", "val")) -> tuple[DataModule, str]:
    """(DataModule, split) of labelled images for a model: `data` (the --data flag) if given, else the source
    recorded in the model, split as it was at training."""
    recorded = dict(meta.get("data") or {})
    if data:
        recorded["source"] = data
    if not recorded.get("source"):
        raise UserError(
            "this model records no data source: pass --data SOURCE (an ImageFolder, CSV manifest or "
            "shard folder with the model's classes)."
        )
    try:
        datamodule = DataModule(**recorded, image_size=meta["image_size"], num_workers=0)
    except UserError as err:
        if data:
            raise
        raise UserError(
            f"the data this model was trained on ({recorded['source']}) is not readable here ({err}). "
            "Pass --data SOURCE: an ImageFolder, CSV manifest or shard folder with the model's "
            "classes."
        ) from None
    if datamodule.classes != list(meta["classes"]):
        raise UserError(
            f"--data {recorded['source']}: its classes {datamodule.classes[:10]} are not the model's "
            f"{list(meta['classes'])[:10]}. Pass data with the model's classes."
        )
    split = next((s for s in splits if s in datamodule.splits and len(datamodule.splits[s])), None)
    if split is None:
        raise UserError(f"--data {recorded['source']}: no {' or '.join(splits)} split to use.")
    return datamodule, split


def augment_on_device(images: torch.Tensor, mode: str, pad: int = 4) -> torch.Tensor:
    """Random pad-crop, horizontal flip and cutout of a uint8 N x C x H x W batch, one draw per image."""
    n, channels, height, width = images.shape
    device = images.device
    if mode in ("crop_flip", "cifar"):
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=device)
        rows = dy + torch.arange(height, device=device).view(1, 1, height, 1)
        cols = dx + torch.arange(width, device=device).view(1, 1, 1, width)
        images = padded[
            torch.arange(n, device=device).view(n, 1, 1, 1),
            torch.arange(channels, device=device).view(1, channels, 1, 1),
            rows,
            cols,
        ]
    flip = torch.rand(n, 1, 1, 1, device=device) < 0.5
    images = torch.where(flip, images.flip(-1), images)
    if mode == "cifar":  # one square of half the side, at a random centre, in half of the images
        half = height // 4
        cy = torch.randint(0, height, (n, 1, 1), device=device)
        cx = torch.randint(0, width, (n, 1, 1), device=device)
        ys = torch.arange(height, device=device).view(1, height, 1)
        xs = torch.arange(width, device=device).view(1, 1, width)
        hole = ((ys - cy).abs() < half) & ((xs - cx).abs() < half) & (torch.rand(n, 1, 1, device=device) < 0.5)
        images = images.masked_fill(hole.unsqueeze(1), 0)
    return images


def preview(datamodule: DataModule, path: Path, n: int = 32, seed: int = 0, cols: int = 8) -> Path:
    """A PNG grid of augmented training samples, each captioned with its class name."""
    import numpy as np
    from PIL import Image, ImageDraw

    samples = datamodule.splits["train"]
    picks = np.random.default_rng(seed).choice(len(samples), size=min(n, len(samples)), replace=False)
    dataset = ImageDataset(
        load_members(samples.subset(picks)),
        datamodule.train_tf,
        datamodule.image_size,
        datamodule.hparams.max_pixels,
        skip_bad=True,
    )
    tile = max(96, datamodule.image_size)
    rows = (len(picks) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (tile + 4), rows * (tile + 18)), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(len(picks)):
        x, y = (k % cols) * (tile + 4), (k // cols) * (tile + 18)
        sample = dataset[k]
        if sample is None:
            draw.text((x + 2, y + tile + 3), "(skipped)", fill="black")
            continue
        image = Image.fromarray(sample[0].permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
        grid.paste(image, (x, y))
        draw.text((x + 2, y + tile + 3), datamodule.classes[sample[1]][: tile // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
