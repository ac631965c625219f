"""The default runtime of a fit's model on a CPU: its ONNX twin on ONNX Runtime, against its torch program and
against its `cnnlab export` to ONNX, at batch 1, in one run.

    python benchmarks/default_runtime.py [--data ../shared/data/cifar10] [--threads 2] [--runs 300]

Fits recipes/cifar10/resnet18_32_onecycle30.yaml (ResNet-18, 32 px) for a few batches (the weights do not
change the time), then reads its logged model: median latency at batch 1 of each (rounds interleaved, the
median of the rounds' medians), load time (download, digest check, runtime start), file size, and what the
twin costs when the model is logged. Target: the default within 1.25x of the export.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar10" / "resnet18_32_onecycle30.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 shards")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime")
    parser.add_argument("--runs", type=int, default=300, help="timed calls per round (5 rounds)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with tempfile.TemporaryDirectory(prefix="cnnlab-runtime-") as tmp:
        limits = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
        fit = [sys.executable, "-m", "cnnlab", "fit", "--config", str(RECIPE), f"--data.source={args.data}"]
        fit += ["--trainer.max_epochs=1", "--data.num_workers=0", "--trainer.enable_progress_bar=false", *limits]
        done = subprocess.run(fit, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        os.chdir(tmp)
        return measure(args.threads, args.runs, Path(tmp))


def measure(threads: int, runs: int, tmp: Path) -> int:
    import torch

    from cnnlab import load, store
    from cnnlab.cnnlab_model import load_network, write_onnx
    from cnnlab.evaluate import latency_ms
    from cnnlab.export import convert

    torch.set_num_threads(threads)
    client = store.client()
    experiment = client.get_experiment_by_name("cnnlab")
    run_id = client.search_runs([experiment.experiment_id])[0].info.run_id
    networks, loads = {}, {}
    for label, kwargs in (("default (ONNX twin)", {}), ("torch program", {"program": True})):
        start = time.perf_counter()
        networks[label] = load.model(run_id, threads, **kwargs)
        loads[label] = time.perf_counter() - start
    program = networks["torch program"]
    start = time.perf_counter()
    twin = write_onnx(program.module, program.image_size, tmp / "twin.onnx")
    twin_seconds = time.perf_counter() - start
    convert(program, tmp / "export", "onnx")
    start = time.perf_counter()
    networks["cnnlab export (ONNX)"] = load_network(tmp / "export", threads)
    loads["cnnlab export (ONNX)"] = time.perf_counter() - start
    rounds = {label: [] for label in networks}
    for _ in range(5):
        for label, network in networks.items():
            rounds[label].append(latency_ms(network.predict, network.image_size, 1, runs))
    ms = {label: statistics.median(values) for label, values in rounds.items()}
    mb = {
        "default (ONNX twin)": twin.stat().st_size / 1e6,
        "torch program": program.meta["bytes"] / 1e6,
        "cnnlab export (ONNX)": networks["cnnlab export (ONNX)"].meta["bytes"] / 1e6,
    }
    reference = ms["cnnlab export (ONNX)"]
    print(
        f"\n{RECIPE.relative_to(ROOT)} at {program.image_size} px, batch 1, {threads} threads, {os.cpu_count()} cores"
    )
    print(f"{'model':<22} {'engine':<12} {'ms b1':>8} {'x export':>9} {'load s':>7} {'MB':>6}")
    for label, network in networks.items():
        print(
            f"{label:<22} {network.engine:<12} {ms[label]:>8.3f} {ms[label] / reference:>9.2f} {loads[label]:>7.2f} "
            f"{mb[label]:>6.1f}"
        )
    ratio = ms["default (ONNX twin)"] / reference
    print(
        f"default against the export: {ratio:.2f}x (target <= 1.25); the program: {ms['torch program'] / reference:.2f}x"
    )
    print(
        f"the twin costs {twin_seconds:.1f} s when the model is logged (ONNX export), and {mb['default (ONNX twin)']:.1f} MB"
    )
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
