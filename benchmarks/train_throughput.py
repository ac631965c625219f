"""Training throughput of every classic family through `cnnlab fit` and through a plain PyTorch loop.

Same model, batch, precision and synthetic data (one DataModule feeds both); prints img/s and the ratio
(target >= 0.98 each). On a GPU the sizes are the published anchors'; on a CPU (`--quick`, the default
there) everything is scaled down so that it finishes.

    python benchmarks/train_throughput.py [--quick] [--compile-resnet50] [--no-tracking] [--families resnet50,...]
"""

from __future__ import annotations

import argparse
import sys

import torch
from overhead import compare

# model, input px, batch, CIFAR stem; the H200 img/s anchor (plain PyTorch, bf16, channels-last)
FAMILIES = [
    ("resnet50", 224, 256, False, 4720),
    ("resnet18", 224, 256, False, 13274),
    ("alexnet", 224, 256, False, 37172),
    ("vgg16_bn", 224, 256, False, 2342),
    ("googlenet", 224, 256, False, 6740),
    ("densenet121", 224, 256, False, 2858),
    ("inception_v4", 299, 256, False, 1308),
    ("inception_resnet_v2", 299, 256, False, 1008),
    ("resnet18", 32, 1024, True, 114089),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and batches (default on a CPU)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile-resnet50", action="store_true", help="also ResNet-50 with torch.compile")
    parser.add_argument("--no-tracking", action="store_true", help="cnnlab fit without its MLflow logger")
    parser.add_argument("--families", help="comma-separated model names to run (default: all)")
    args = parser.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    rows = []
    runs = [
        (model, px, batch, small, anchor, False)
        for model, px, batch, small, anchor in FAMILIES
        if not args.families or model in args.families.split(",")
    ]
    if args.compile_resnet50 and not quick:
        runs.append((*FAMILIES[0][:4], 6676, True))  # last: compiling takes a while, and may fail alone
    for model, px, batch, small, anchor, compiled in runs:
        if quick:
            px, batch = (75 if px == 299 else 64 if px == 224 else px), 8
        try:
            r = compare(
                model,
                px,
                batch,
                warmup=3 if quick else 10,
                steps=args.steps or (12 if quick else 30),
                small_input=small,
                repeats=args.repeats,
                compile=compiled,
                tracking=not args.no_tracking,
            )
        except Exception as err:  # one family's failure (memory, a compiler) must not hide the others' figures
            print(f"{model}@{px}{' compiled' if compiled else ''}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append({**r, "compile": compiled, "anchor": anchor if not quick else None})
        print(
            f"{model}@{px} b{batch}{' compiled' if compiled else ''}: plain {r['plain']:.0f} img/s, "
            f"cnnlab {r['cnnlab']:.0f} img/s, ratio {r['ratio']:.3f}",
            flush=True,
        )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"\n{device}; precision {'bf16-mixed, channels-last' if torch.cuda.is_available() else 'fp32'}; "
        f"cnnlab fit {'without' if args.no_tracking else 'with'} MLflow tracking"
    )
    print(f"{'model':<24} {'px':>4} {'batch':>5} {'plain img/s':>12} {'cnnlab img/s':>13} {'ratio':>6} {'anchor':>8}")
    for r in rows:
        name = r["model"] + (" (compile)" if r["compile"] else "")
        anchor = f"{r['anchor']:,}" if r["anchor"] else "-"
        print(
            f"{name:<24} {r['image_size']:>4} {r['batch_size']:>5} {r['plain']:>12,.0f} {r['cnnlab']:>13,.0f} "
            f"{r['ratio']:>6.3f} {anchor:>8}"
        )
    print(f"lowest ratio {min(r['ratio'] for r in rows):.3f} (target >= 0.98 for every family)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
