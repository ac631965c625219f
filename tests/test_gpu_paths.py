"""The code paths a GPU takes, run on the CPU first: torch.compile (inductor compiles for the CPU too), bf16 mixed
precision (CPU autocast, channels-last by default), and two-process DDP (gloo) with both. Each fit's loss falls and
its logged model loads and predicts. The short quick start at 8 px (bf16 has no native kernels on most CPUs: even
channels-last, a step takes 4x fp32's)."""

import numpy as np
import pytest

from conftest import cnnlab, mlflow_client, only_run

PATHS = {
    "compile": ["--model.compile=true"],
    # channels-last by default in bf16: bf16 convolutions in the default layout take 30 s a step on a CPU, 2 s in it
    "bf16": ["--trainer.precision=bf16-mixed"],
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
def test_a_gpu_code_path_trains_on_the_cpu_and_its_model_predicts(path, small, workdir):
    from cnnlab import load
    from cnnlab.data import labelled
    from cnnlab.evaluate import logits

    flags = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    result = cnnlab("fit", "--config", small, *flags, *PATHS[path], cwd=workdir)
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
