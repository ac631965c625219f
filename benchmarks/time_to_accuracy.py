"""Wall time of `cnnlab fit` on a recipe, from the command's start to its test top-1, against a target.

    python benchmarks/time_to_accuracy.py                         # quickstart on this CPU: >= 97% in <= 60 s
    python benchmarks/time_to_accuracy.py --config recipes/cifar10/resnet18_32_onecycle40_gpu.yaml \\
        --target 0.94 --seconds 90                                # one GPU
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--target", type=float, default=0.97, help="test top-1 to reach")
    parser.add_argument("--seconds", type=float, default=60, help="wall-time budget")
    parser.add_argument("overrides", nargs="*", help="dotted recipe keys, e.g. --trainer.max_epochs=30")
    args, extra = parser.parse_known_args(argv)
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "fit",
        "--config",
        args.config,
        "--trainer.enable_progress_bar=false",
        "--log_model=false",
        *args.overrides,
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"test/acc (\d\.\d+)", result.stdout)
    if result.returncode != 0 or not found:
        print(result.stdout[-2000:], result.stderr[-3000:])
        return 1
    accuracy = float(found.group(1))
    print(
        f"{args.config}: test top-1 {accuracy:.4f} in {seconds:.1f} s wall, command start to test result "
        f"(target {args.target:.2f} in {args.seconds:.0f} s: "
        f"{'met' if accuracy >= args.target and seconds <= args.seconds else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
