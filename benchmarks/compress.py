"""Compression on the CIFAR-10 ResNet-18 recipe: int8, 50% channel pruning and distillation, measured.

Trains (one `cnnlab fit` each, `--epochs` apiece): a ResNet-50 teacher, the ResNet-18 recipe, the same
student distilled from the teacher, and the trained ResNet-18 with half its channels pruned, fine-tuned
for a third of the epochs. Then exports ONNX fp32 and static int8, and OpenVINO IR fp32 and int8 (NNCF) where
OpenVINO is installed, and times them on the CPU (ONNX Runtime, OpenVINO); with `--device cuda`, also the ONNX
files on ONNX Runtime's CUDA and TensorRT providers (onnxruntime-gpu; rows say so when a provider is missing).
Prints the figures against the targets, whatever they are:
- int8 vs ONNX fp32 latency at batch 1: >= 2.5x faster, <= 1 point top-1 drop;
- 50% structured pruning: >= 1.5x faster, <= 2 points drop after fine-tuning;
- distilled student vs the same student from scratch: >= +0.5 points.

    python benchmarks/compress.py [--epochs 15] [--threads 2] [--no-tracking] [--limit-batches N] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cnnlab import load
from cnnlab.cnnlab_model import load_network
from cnnlab.data import labelled
from cnnlab.evaluate import latency_ms, logits, scores
from cnnlab.export import convert, openvino_installed

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "cifar10"


def fit(name: str, recipe: str, folder: Path, args, extra: list[str]) -> tuple[float, Path, float]:
    """(test top-1, best checkpoint, seconds) of one `cnnlab fit`."""
    root = folder / name
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "fit",
        "--config",
        str(RECIPES / recipe),
        "--log_model=false",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *(["--trainer.logger=false"] if args.no_tracking else []),
        *(
            [
                f"--trainer.limit_train_batches={args.limit_batches}",
                f"--trainer.limit_val_batches={args.limit_batches}",
                f"--trainer.limit_test_batches={args.limit_batches}",
            ]
            if args.limit_batches
            else []
        ),
        *([f"--data.batch_size={args.batch_size}"] if args.batch_size else []),
        *([f"--data.source={args.data}"] if args.data else []),
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"test/acc (\d\.\d+)", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
    checkpoint = max(root.rglob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    print(f"{name}: test top-1 {float(found.group(1)):.4f} in {seconds:.0f} s", flush=True)
    return float(found.group(1)), checkpoint, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the latency")
    parser.add_argument("--runs", type=int, default=50, help="timed runs at batch 1")
    parser.add_argument("--no-tracking", action="store_true", help="fits without MLflow")
    parser.add_argument("--limit-batches", type=int, help="a smoke run: this many batches per epoch and split")
    parser.add_argument("--batch-size", type=int, help="override the recipes' batch size")
    parser.add_argument("--data", help="the CIFAR-10 shards (default: the recipes' ../shared/data/cifar10)")
    parser.add_argument("--test-images", type=int, help="score the exported variants on this many test images")
    parser.add_argument("--device", default="cpu", help="cuda: also ONNX Runtime's CUDA and TensorRT providers")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher = fit("teacher resnet50", "resnet50_32_onecycle30.yaml", folder, args, [])
        scratch = fit("resnet18 from scratch", "resnet18_32_onecycle30.yaml", folder, args, [])
        callbacks = [
            {
                "class_path": "cnnlab.callbacks.Distillation",
                "init_args": {"teacher": str(teacher[1]), "temperature": 4.0, "alpha": 0.9},
            },
        ]
        distilled = fit(
            "resnet18 distilled",
            "resnet18_32_distill_resnet50.yaml",
            folder,
            args,
            [f"--trainer.callbacks={json.dumps(callbacks)}"],
        )
        prune = [
            {"class_path": "cnnlab.callbacks.Pruning", "init_args": {"mode": "structured", "amount": 0.5}},
        ]
        pruned = fit(
            "resnet18 pruned 50% + fine-tuned",
            "resnet18_32_onecycle30.yaml",
            folder,
            args,
            [
                f"--trainer.callbacks={json.dumps(prune)}",
                f"--model.pretrained={scratch[1]}",
                "--model.lr_scheduler.init_args.pct_start=0.15",
                f"--trainer.max_epochs={max(2, args.epochs // 3)}",
                "--model.optimizer.init_args.lr=0.05",
            ],
        )
        torch.set_num_threads(args.threads)
        for name, checkpoint in (("resnet18", scratch[1]), ("resnet18 pruned", pruned[1])):
            source = load.model(str(checkpoint))
            datamodule, split = labelled(source.meta, args.data)
            if args.test_images:
                datamodule.splits[split] = datamodule.splits[split].subset(range(args.test_images))
            formats = [("onnx", False)]
            if name == "resnet18":
                formats += [
                    ("onnx", True),
                    *([("openvino", False), ("openvino", True)] if openvino_installed() else []),
                ]
            for fmt, int8 in formats:
                folder_of = folder / f"{name.replace(' ', '_')}-{fmt}{'-int8' if int8 else ''}"
                meta = convert(source, folder_of, fmt, int8, datamodule.splits["train"])
                devices = [
                    "cpu",
                    *([args.device] if args.device.startswith("cuda") and meta["format"] == "onnx" else []),
                ]
                for device in devices:  # on a GPU: ONNX Runtime's CUDA / TensorRT providers, or a line saying why not
                    network = load_network(folder_of, args.threads, device)
                    label = f"{name} {fmt} {'int8' if int8 else 'fp32'}{'' if device == 'cpu' else ' ' + device}"
                    results[label] = {
                        "ms_b1": latency_ms(network.predict, 32, 1, args.runs),
                        "ms_b32": latency_ms(network.predict, 32, 32, 10),
                        "top1": scores(
                            logits(network, datamodule.splits[split]),
                            datamodule.splits[split].labels,
                            len(network.classes),
                        )["test/acc"],
                        "params": source.params,
                        "mb": meta["bytes"] / 1e6,
                    }
    images = args.test_images or "all"
    print(
        f"\nCPU latency with {args.threads} threads (ONNX Runtime, OpenVINO; rows naming cuda on the GPU); top-1 of "
        f"the exported files on {images} CIFAR-10 test images, of the fits on all of them"
    )
    print(f"{'variant':<32} {'params':>8} {'MB':>6} {'ms b1':>7} {'ms b32':>7} {'top-1':>7}")
    for label, r in results.items():
        print(
            f"{label:<32} {r['params'] / 1e6:>7.2f}M {r['mb']:>6.1f} {r['ms_b1']:>7.2f} {r['ms_b32']:>7.1f} {r['top1']:>7.4f}"
        )
    fp32, int8, small = (
        results["resnet18 onnx fp32"],
        results["resnet18 onnx int8"],
        results["resnet18 pruned onnx fp32"],
    )
    print(
        f"int8 vs fp32 at batch 1: {fp32['ms_b1'] / int8['ms_b1']:.2f}x faster (target >= 2.5x), "
        f"drop {100 * (fp32['top1'] - int8['top1']):+.2f} points (target <= 1)"
    )
    if "resnet18 openvino int8" in results:
        ov32, ov8 = results["resnet18 openvino fp32"], results["resnet18 openvino int8"]
        print(
            f"OpenVINO against ONNX Runtime at batch 1: fp32 {fp32['ms_b1'] / ov32['ms_b1']:.2f}x, int8 "
            f"{int8['ms_b1'] / ov8['ms_b1']:.2f}x faster; int8 drop {100 * (ov32['top1'] - ov8['top1']):+.2f} points"
        )
    print(
        f"50% channel pruning: {fp32['ms_b1'] / small['ms_b1']:.2f}x faster at batch 1, "
        f"{fp32['ms_b32'] / small['ms_b32']:.2f}x at 32 (target >= 1.5x), drop {100 * (scratch[0] - pruned[0]):+.2f} "
        "points after fine-tuning (target <= 2)"
    )
    print(
        f"distillation: student {distilled[0]:.4f} vs from scratch {scratch[0]:.4f}: "
        f"{100 * (distilled[0] - scratch[0]):+.2f} points (target >= +0.5); teacher {teacher[0]:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
