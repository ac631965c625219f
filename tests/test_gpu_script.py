"""`benchmarks/gpu.sh --dry-run`: every step of the GPU figures, at tiny sizes on the CPU, so that the script is
known to work before a GPU sees it (its own file: a test process runs it beside the GPU-path fits)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR10, ROOT, STORE_VARIABLES


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.exists(), reason="the shared CIFAR-10 shards are not on this machine")
def test_the_gpu_script_runs_every_step_on_the_cpu(tmp_path):
    """`benchmarks/gpu.sh --dry-run`: each step of the GPU figures, at tiny sizes, ends well."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # python3: this environment's
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path / "logs"), str(CIFAR10)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    steps = re.findall(r"^=== (\w+):", result.stdout, re.M)
    exits = re.findall(r"^--- exit (\d+)", result.stdout, re.M)
    assert steps == ["train_throughput", "time_to_accuracy", "real_data_resnet50", "data_throughput", "compress"]
    assert exits == ["0"] * 5, result.stdout[-4000:]
    assert "Traceback" not in result.stdout
