"""Framework overhead: training steps through `cnnlab fit` against a plain PyTorch loop.

Same model, batch, precision and synthetic data (the same DataModule feeds both); the plain loop does
only what any training loop must (copy, normalize, forward, loss, backward, step). Prints img/s of each
and their ratio, measured in this one run (target: ratio >= 0.98).

    python benchmarks/overhead.py [--model resnet18] [--image-size 32] [--batch-size 128] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from lightning.pytorch import Callback

from cnnlab.data import DataModule
from cnnlab.module import ClassifierModule
from cnnlab.run import CnnlabCLI


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(
    model_name,
    image_size,
    batch_size,
    warmup,
    steps,
    workers,
    small_input,
    device,
    compile=False,
    data: dict | None = None,
) -> float:
    """img/s of a hand-written loop over the same data and model (bf16 autocast, channels-last and cudnn
    benchmark on a GPU, as cnnlab's GPU defaults)."""
    torch.backends.cudnn.benchmark = device == "cuda"
    options = data or {"source": "synthetic", "synthetic_size": batch_size * (warmup + steps + 1)}
    data = DataModule(
        image_size=image_size,
        batch_size=batch_size,
        num_workers=workers,
        val_fraction=0,
        test_fraction=0,
        **{k: v for k, v in options.items() if k != "device_augment"},
    )
    module = ClassifierModule(
        model_name, num_classes=10, image_size=image_size, small_input=small_input, channels_last=device == "cuda"
    ).to(device)
    if device == "cuda":
        module.net.to(memory_format=torch.channels_last)
    if compile:
        module.net = torch.compile(module.net)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    module.train()
    start = None
    for i, (images, labels) in enumerate(data.train_dataloader()):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        if i == warmup + steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if options.get("device_augment"):
            from cnnlab.data import augment_on_device

            images = augment_on_device(images, options["device_augment"])
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


class _StepTimer(Callback):
    def __init__(self, warmup, steps, device):
        self.warmup, self.steps, self.device, self.seconds = warmup, steps, device, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warmup + self.steps - 1:
            _sync(self.device)
            self.seconds = time.perf_counter() - self.start


def cnnlab_fit(
    model_name,
    image_size,
    batch_size,
    warmup,
    steps,
    workers,
    small_input,
    device,
    compile=False,
    data: dict | None = None,
    extra: list[str] = (),
    tracking: bool = True,
) -> float:
    """img/s of the same steps through `cnnlab fit` (MLflow tracking, progress bar and all)."""
    timer = _StepTimer(warmup, steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        cli = CnnlabCLI(
            args=[
                f"--model.model={model_name}",
                f"--model.small_input={small_input}",
                "--model.optimizer=torch.optim.SGD",
                "--model.optimizer.lr=0.01",
                "--model.optimizer.momentum=0.9",
                *[
                    f"--data.{k}={v}"
                    for k, v in (
                        data or {"source": "synthetic", "synthetic_size": batch_size * (warmup + steps + 1)}
                    ).items()
                ],
                f"--data.image_size={image_size}",
                f"--data.batch_size={batch_size}",
                f"--data.num_workers={workers}",
                "--data.val_fraction=0",
                "--data.test_fraction=0",
                f"--trainer.max_steps={warmup + steps}",
                f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                "--trainer.devices=1",
                f"--trainer.default_root_dir={tmp}",
                "--test_after_fit=false",
                "--seed_everything=0",
                f"--model.compile={compile}",
                *([] if tracking else ["--trainer.logger=false"]),
                *extra,
            ],
            run=False,
        )
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        del os.environ["MLFLOW_TRACKING_URI"]
    return steps * batch_size / timer.seconds


def compare(
    model_name,
    image_size,
    batch_size,
    warmup=10,
    steps=60,
    workers=None,
    small_input=False,
    device=None,
    repeats=2,
    compile=False,
    tracking=True,
    data: dict | None = None,
    extra: list[str] = (),
) -> dict:
    """Alternate the two, `repeats` times each, and keep each one's median."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = workers if workers is not None else min(16, os.cpu_count())
    args = (model_name, image_size, batch_size, warmup, steps, workers, small_input, device, compile)
    plain, fit = [], []
    for _ in range(repeats):
        plain.append(plain_loop(*args, data=data))
        fit.append(cnnlab_fit(*args, data=data, extra=extra, tracking=tracking))
    result = {
        "model": model_name,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": device,
        "plain": statistics.median(plain),
        "cnnlab": statistics.median(fit),
    }
    result["ratio"] = result["cnnlab"] / result["plain"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-tracking", action="store_true", help="cnnlab fit without its MLflow logger")
    parser.add_argument("--source", help="real data instead of synthetic images, e.g. ../shared/data/cifar10")
    parser.add_argument("--augment", default="none", help="with --source: the preset the loader workers apply")
    parser.add_argument("--device-augment", help="with --source: augmentation on the device (flip, crop_flip, cifar)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    data = (
        {
            "source": args.source,
            "augment": args.augment,
            **({"device_augment": args.device_augment} if args.device_augment else {}),
        }
        if args.source
        else None
    )
    r = compare(
        args.model,
        args.image_size,
        args.batch_size,
        args.warmup,
        args.steps,
        args.workers,
        small_input=args.image_size <= 64,
        repeats=args.repeats,
        tracking=not args.no_tracking,
        compile=args.compile,
        data=data,
    )
    print(
        f"{r['model']} @{r['image_size']} batch {r['batch_size']} on {r['device']}"
        f"{', data ' + args.source + ' (' + args.augment + (', device ' + args.device_augment if args.device_augment else '') + ')' if args.source else ', synthetic data'}"
        f"{', compiled' if args.compile else ''}: plain loop {r['plain']:.0f} img/s, "
        f"cnnlab fit {r['cnnlab']:.0f} img/s, ratio {r['ratio']:.3f} (target >= 0.98)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
