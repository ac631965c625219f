"""The code paths a GPU takes, run on the CPU first: torch.compile (inductor compiles for the CPU too),
bf16 mixed precision (CPU autocast) with channels-last, and two-process DDP (gloo) with bf16. Each fit's loss falls and
its logged model loads and predicts. And the GPU benchmark script, every step at tiny sizes on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR10, QUICKSTART, ROOT, cnnlab, mlflow_client, only_run

PATHS = {
    "compile": ["--model.compile=true"],
    "bf16_channels_last": ["--trainer.precision=bf16-mixed", "--model.channels_last=true"],  # a GPU fit's defaults
    "ddp_bf16": [
        "--trainer.precision=bf16-mixed",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--data.num_workers=0",
        "--data.val_fraction=0.25",  # an even split over two ranks
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_a_gpu_code_path_trains_on_the_cpu_and_its_model_predicts(path, workdir):
    from cnnlab import load
    from cnnlab.data import labelled
    from cnnlab.evaluate import logits

    flags = ["--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    result = cnnlab("fit", "--config", QUICKSTART, *flags, *PATHS[path], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client()
    run = only_run(client)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss_epoch"), key=lambda m: m.step)
    assert len(history) == 3 and history[-1].value < 0.7 * history[0].value, [m.value for m in history]
    network = load.model(run.info.run_id)
    datamodule, split = labelled(network.meta, None)  # the test split of the fit, from the model's record
    test = datamodule.splits[split]
    answers = logits(network, test).argmax(1)
    assert np.isfinite(answers).all() and (answers == np.array(test.labels)).mean() > 0.5  # chance: 0.1


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.exists(), reason="the shared CIFAR-10 shards are not on this machine")
def test_the_gpu_script_runs_every_step_on_the_cpu(tmp_path):
    """`benchmarks/gpu.sh --dry-run`: each step of the GPU figures, at tiny sizes, ends well."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
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
