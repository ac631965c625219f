"""cnnlab's albumentations training pipelines against torchvision v2 doing the same ops, per CPU core.

Both decode the same JPEG bytes and produce a uint8 C x H x W tensor:
- CIFAR: the shared CIFAR-10 shards at 32 px; pad-4 crop (an integer shift), flip, a 16 px cutout;
- ImageNet-style: 500 x 375 JPEGs (made here, once); short side to 224, random crop, flip, affine
  (shift, scale, rotate) and colour jitter, as cnnlab's `standard` preset.
Prints img/s on one core for each and the ratio (albumentations / torchvision). Then the whole training
loader with a worker per core, for both kinds of shards, streamed (`data.stream: true`) against read
into memory: img/s and the ratio, which says whether streaming keeps every core as busy. Last, torchvision's
automatic policies (RandAugment, TrivialAugmentWide, AugMix) where cnnlab runs them, on each image in the
loader workers (all cores), against on whole batches on the device (`--device`, the GPU in gpu.sh), where
torchvision draws one op and magnitude per batch rather than per image.

    python benchmarks/data_throughput.py [--images 2000] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import cv2
import numpy as np
import torch
from PIL import Image

from cnnlab.data import POLICIES, train_transform
from cnnlab.sources import open_image, read_source, resolve_path


def cifar_bytes(n: int, source: str) -> list[bytes]:
    _, splits = read_source(source)
    return splits["train"].items[:n]


def imagenet_bytes(n: int) -> list[bytes]:
    """Smooth random 500 x 375 photos-like JPEGs (quality 90), the typical ImageNet size."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = cv2.resize(small, (500, 375), interpolation=cv2.INTER_CUBIC)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def cnnlab_pipeline(preset: str, size: int):
    transform = train_transform(preset, size)
    return lambda raw: torch.from_numpy(transform(open_image(raw, 10**9)[0])).permute(2, 0, 1)


def torchvision_pipeline(kind: str, size: int):
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    if kind == "cifar":
        ops = v2.Compose(
            [
                v2.RandomCrop(size, padding=4),
                v2.RandomHorizontalFlip(),
                v2.RandomErasing(p=0.5, scale=(0.25, 0.25), ratio=(1, 1), value=0),
            ]
        )
    else:
        ops = v2.Compose(
            [
                v2.Resize(size),
                v2.RandomCrop(size),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.75, 1.25))], p=0.8),
                v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
            ]
        )
    return lambda raw: ops(decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8)))


def images_per_second(pipeline, items: list[bytes], repeat: int = 1) -> float:
    for raw in items[:20]:
        pipeline(raw)
    start = time.perf_counter()
    for _ in range(repeat):
        for raw in items:
            out = pipeline(raw)
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    return repeat * len(items) / (time.perf_counter() - start)


def write_shards(folder: str, items: list[bytes], shards: int = 4) -> str:
    """ImageNet-style WebDataset shards (plain tar, as large data sets are kept) in a temporary folder."""
    for k in range(shards):
        with tarfile.open(f"{folder}/train-{k:05d}.tar", "w") as tar:
            for i in range(k, len(items), shards):
                for ext, data in (("jpg", items[i]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def loader_images_per_second(source: str, preset: str, size: int, batch: int, stream: bool, batches: int) -> float:
    from cnnlab.data import DataModule

    datamodule = DataModule(source, augment=preset, image_size=size, batch_size=batch, stream=stream)
    loader = iter(datamodule.train_dataloader())
    next(loader)  # workers started
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(loader)[1])
    return n / (time.perf_counter() - start)


def policy_rows(items: list[bytes], size: int, device: str, batch: int = 256) -> list[tuple[str, float, float]]:
    """(policy, img/s per image in the workers, img/s per batch on the device) at `size` px."""
    from torchvision.transforms import v2

    cores = len(os.sched_getaffinity(0))
    images = [open_image(raw, 10**9)[0] for raw in items[:batch]]
    images = torch.stack([torch.from_numpy(cv2.resize(i, (size, size))).permute(2, 0, 1) for i in images]).to(device)
    rows = []
    for name in POLICIES:
        workers = images_per_second(cnnlab_pipeline(name, size), items)  # the same per-image path
        policy = getattr(v2, POLICIES[name])()
        flip = v2.RandomHorizontalFlip()
        for _ in range(3):
            policy(flip(images))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            out = policy(flip(images))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        assert out.shape == images.shape
        rows.append((name, workers * cores, repeats * len(images) / (time.perf_counter() - start)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="CIFAR images (ImageNet-style: a tenth)")
    parser.add_argument("--data", default="../shared/data/cifar10", help="the CIFAR-10 shards")
    parser.add_argument("--batches", type=int, default=40, help="loader batches timed")
    parser.add_argument("--device", default="cpu", help="where the batched policies run (cuda on a GPU)")
    args = parser.parse_args(argv)
    source = str(resolve_path(args.data))
    with tempfile.TemporaryDirectory() as folder:
        loaders = [
            (
                name,
                *(loader_images_per_second(shards, preset, size, batch, stream, batches) for stream in (True, False)),
            )
            for name, shards, preset, size, batch, batches in (
                ("CIFAR-10 32 px, gz shards", source, "cifar", 32, 256, args.batches),
                (  # 1,200 images and 10 batches at the defaults
                    "ImageNet-style 224 px, tar",
                    write_shards(folder, imagenet_bytes(max(256, args.images * 3 // 5))),
                    "standard",
                    224,
                    64,
                    max(1, args.batches // 4),
                ),
            )
        ]
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    inputs = (  # read and encoded once: both comparisons time the same images
        ("CIFAR-10 32 px", cifar_bytes(args.images, source), 32, "cifar"),
        ("ImageNet-style 224 px", imagenet_bytes(max(50, args.images // 10)), 224, "standard"),
    )
    rows = []
    for kind, items, size, preset in inputs:
        ours = images_per_second(cnnlab_pipeline(preset, size), items)
        theirs = images_per_second(torchvision_pipeline("cifar" if size == 32 else "imagenet", size), items)
        rows.append((kind, ours, theirs))
    print(f"\none CPU core ({os.cpu_count()} on this machine), decode + augment to a uint8 tensor")
    print(f"{'pipeline':<24} {'albumentations':>15} {'torchvision v2':>15} {'ratio':>6}")
    for kind, ours, theirs in rows:
        print(f"{kind:<24} {ours:>11,.0f} i/s {theirs:>11,.0f} i/s {ours / theirs:>6.2f}")
    print(f"\nthe training loader, {len(os.sched_getaffinity(0))} workers, shards streamed or read into memory")
    print(f"{'shards':<28} {'streamed':>12} {'in memory':>12} {'ratio':>6}")
    for name, streamed, in_memory in loaders:
        print(f"{name:<28} {streamed:>8,.0f} i/s {in_memory:>8,.0f} i/s {streamed / in_memory:>6.2f}")
    cores = len(os.sched_getaffinity(0))
    for kind, items, size, _ in inputs:
        print(
            f"\n{kind}: automatic policies per image in {cores} workers (one core each, as measured on one) "
            f"against per batch of 256 on {args.device}"
        )
        print(f"{'policy':<16} {'workers':>12} {'device':>12} {'device / workers':>17}")
        for name, workers, device in policy_rows(items, size, args.device):
            print(f"{name:<16} {workers:>8,.0f} i/s {device:>8,.0f} i/s {device / workers:>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
