"""Fine-tuning against training from scratch, same recipe, same epochs: test top-1 after each budget.

Runs recipes/finetune/digits_from_cifar10.yaml (digits, started from the network trained on CIFAR-10 by
recipes/finetune/cifar10_source.yaml and registered as cifar10-resnet18) and the same with
--model.pretrained=false, for 1, 2 and 5 epochs, and prints a Markdown table with the gain.

    cnnlab fit --config recipes/finetune/cifar10_source.yaml --register cifar10-resnet18   # once
    python benchmarks/finetune.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

RECIPE = "recipes/finetune/digits_from_cifar10.yaml"


def test_top1(epochs: int, pretrained: bool) -> float:
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "fit",
        "--config",
        RECIPE,
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger.init_args.experiment_name=finetune-benchmark",
        "--log_model=false",
        *([] if pretrained else ["--model.pretrained=false"]),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"test/acc ([0-9.]+)", result.stdout)
    if result.returncode or not found:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5])
    args = parser.parse_args()
    print("| epochs | from scratch | from CIFAR-10 weights | gain (points) |\n|---|---|---|---|")
    for epochs in args.epochs:
        scratch, tuned = test_top1(epochs, False), test_top1(epochs, True)
        print(f"| {epochs} | {scratch:.2%} | {tuned:.2%} | {100 * (tuned - scratch):+.1f} |", flush=True)


if __name__ == "__main__":
    main()
