"""Whole fits through the real command: quick-start accuracy and its MLflow run, resume, DDP."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnlab.data import DataModule
from cnnlab.module import ClassifierModule
from conftest import QUICKSTART, cnnlab, mlflow_client, only_run


def test_quickstart_reaches_95_percent(quickstart):
    _, _, run, result = quickstart
    assert run.data.metrics["test/acc"] >= 0.95
    assert "test/acc" in result.stdout and "cnnlab ui" in result.stdout


def test_quickstart_run_holds_recipe_params_metrics_checkpoint_and_confusion_matrix(quickstart):
    _, client, run, _ = quickstart
    assert run.info.run_name == "quickstart" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.model"] == "resnet18" and params["data.source"] == "digits"
    assert params["model.optimizer.init_args.lr"] == "0.1" and params["trainer.max_epochs"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 8
    assert len(client.get_metric_history(run.info.run_id, "train/loss_epoch")) == 8
    assert {
        "test/acc",
        "test/f1",
        "test/top5",
        "test/loss",
        "test/ece",
        "test/acc_class/7",
        "test/precision_class/7",
    } <= set(run.data.metrics)
    artifacts = {
        a.path
        for top in client.list_artifacts(run.info.run_id)
        for a in ([top] if not top.is_dir else client.list_artifacts(run.info.run_id, top.path))
    }
    assert {"recipe.yaml", "checkpoints/best.ckpt", "plots/confusion_matrix.png"} <= artifacts
    recipe = Path(client.download_artifacts(run.info.run_id, "recipe.yaml")).read_text()
    assert "model: resnet18" in recipe and "OneCycle" in recipe


def stop_in_second_epoch(args: list, workdir: Path, signum: int) -> tuple[int, str]:
    """Start a fit, send `signum` early in its second epoch; (exit code, stderr)."""
    first = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list(workdir.glob("mlruns/*/*/checkpoints/last.ckpt")) and time.time() < deadline:
        assert first.poll() is None, "the fit ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(1.5)  # into the second epoch
    assert first.poll() is None, "the fit ended before it could be stopped mid-epoch"
    first.send_signal(signum)
    _, stderr = first.communicate(timeout=120)
    return first.returncode, stderr


@pytest.mark.slow
def test_resume_after_a_kill_continues_the_same_mlflow_run(workdir):
    args = [
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=4",
        "--data.num_workers=0",
        "--data.image_size=8",
        "--trainer.enable_progress_bar=false",
    ]
    stop_in_second_epoch(args, workdir, signal.SIGKILL)
    client = mlflow_client()
    killed = only_run(client)
    assert killed.info.status == "RUNNING"
    assert len(client.get_metric_history(killed.info.run_id, "val/acc")) == 1

    resumed = cnnlab(*args, "--ckpt_path", "last", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = only_run(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("val/acc", "train/loss_epoch"):  # one value per epoch, before and after the kill, in order
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
        steps = [m.step for m in history]
        assert len(steps) == 4 and steps == sorted(set(steps)), (key, steps)
    for key in ("lr/decay", "train/loss_step"):  # steps replayed after the resume are not logged a second time
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert "test/acc" in run.data.metrics


@pytest.mark.slow
def test_sigterm_saves_marks_the_run_killed_and_resume_keeps_every_learning_rate_of_a_timm_scheduler(workdir):
    timm_cosine = {  # stepped per update (t_in_epochs false) over the fit's 54 updates, with its own warmup
        "class_path": "timm.scheduler.CosineLRScheduler",
        "init_args": {"t_initial": 54, "t_in_epochs": False, "warmup_t": 5, "warmup_lr_init": 0.001},
    }
    args = [
        "fit",
        "--config",
        QUICKSTART,
        f"--model.lr_scheduler={json.dumps(timm_cosine)}",
        "--trainer.max_epochs=3",
        "--data.num_workers=0",
        "--data.image_size=8",
        "--trainer.enable_progress_bar=false",
        "--log_model=false",
    ]
    (workdir / "reference").mkdir()  # its own store: its checkpoints are not the stopped fit's
    reference = cnnlab(*args, cwd=workdir / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference = only_run(mlflow_client(f"sqlite:///{workdir}/reference/mlruns/mlflow.db"))
    code, stderr = stop_in_second_epoch(args, workdir, signal.SIGTERM)
    assert code == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "--ckpt_path last" in stderr
    client = mlflow_client()
    stopped = only_run(client)
    assert stopped.info.status == "KILLED"

    resumed = cnnlab(*args, "--ckpt_path", "last", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = only_run(client)
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    reference_client = mlflow_client(f"sqlite:///{workdir}/reference/mlruns/mlflow.db")
    for key in ("lr/decay", "lr/no_decay"):  # LearningRateMonitor's, every log_every_n_steps (10) steps
        ours = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        theirs = {m.step: m.value for m in reference_client.get_metric_history(reference.info.run_id, key)}
        assert ours == pytest.approx(theirs, rel=1e-9) and len(ours) == 3 * 18 // 10  # the same LR at every step
        values = [theirs[step] for step in sorted(theirs)]  # the cosine, stepped per update, after the warmup
        assert values == sorted(values, reverse=True) and values[-1] < 0.1 * values[0] and values[0] < 0.1
    assert run.data.metrics["test/acc"] == pytest.approx(reference.data.metrics["test/acc"], abs=0.03)


def test_a_scheduler_class_path_leaves_total_steps_for_the_module_to_fill():
    """The adapter in ClassifierModule.schedule: jsonargparse gives a class_path as a functools.partial whose
    `keywords` hold every init arg; an upgrade that changes this fails here, not in a user's fit."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LRSchedulerCallable

    parser = ArgumentParser()
    parser.add_argument("--scheduler", type=LRSchedulerCallable)
    config = parser.parse_args(['--scheduler={"class_path": "cnnlab.schedules.OneCycle"}'])
    scheduler = parser.instantiate_classes(config).scheduler
    assert scheduler.keywords["total_steps"] is None


@pytest.mark.parametrize("precision, expected", [("bf16-mixed", True), ("32-true", False)])
def test_bf16_on_the_cpu_runs_channels_last_unless_told(precision, expected):
    """bf16 convolutions in the default layout are about 15x slower on a CPU without bf16 kernels."""
    import lightning as L

    for asked in (None, False):
        module = ClassifierModule("resnet18", num_classes=2, small_input=True, image_size=16, channels_last=asked)
        module.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
        module.setup("fit")
        kernel = next(p for p in module.net.parameters() if p.dim() == 4)
        chosen = expected and asked is None
        assert module.hparams.channels_last is chosen
        assert kernel.is_contiguous(memory_format=torch.channels_last) is chosen


@pytest.mark.slow
def test_onecycle_on_a_very_short_fit_is_refused_or_works(workdir):
    short = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        "--data.num_workers=0",
        "--data.image_size=8",
        "--log_model=false",
        "--test_after_fit=false",
        cwd=workdir,
    )
    assert short.returncode == 0, short.stderr[-3000:]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_makes_one_run_with_synced_metrics(workdir):
    result = cnnlab(
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=2",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--data.num_workers=0",
        "--data.image_size=8",
        "--data.val_fraction=0.25",  # 450 images: an even split over two ranks, no padding
        "--trainer.enable_progress_bar=false",
        "--register",
        "ddp",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_client()
    run = only_run(client)  # rank 0 alone talks to MLflow: one run, one registered version
    assert [v.run_id for v in client.search_model_versions("name='ddp'")] == [run.info.run_id]
    logged = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(logged) == 2
    # The last checkpoint holds the weights of the last validation: evaluate them on the whole val split alone.
    last = next(workdir.glob("mlruns/*/*/checkpoints/last.ckpt"))
    model = ClassifierModule.load_from_checkpoint(last, map_location="cpu").eval()
    data = DataModule("digits", image_size=8, val_fraction=0.25, test_fraction=0.2, num_workers=0)
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.loader("val"):
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    assert total == 450
    assert max(logged, key=lambda m: m.step).value == pytest.approx(correct / total, abs=1e-6)


def test_the_l1_penalty_adds_to_the_loss():
    import torch
    from torch import nn

    from cnnlab.module import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule("resnet18", num_classes=3, small_input=True, image_size=16, l1=1e-4).eval()
    batch = (torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    with_l1 = module.training_step(batch, 0)
    module.hparams.l1 = 0.0
    plain = module.training_step(batch, 0)
    weights = sum(m.weight.abs().sum() for m in module.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert float(with_l1 - plain) == pytest.approx(1e-4 * float(weights), rel=1e-4)


def test_ema_warms_up_its_decay():
    import torch

    from cnnlab.callbacks import EMA

    ema, averaged = EMA(decay=0.999), [torch.zeros(2)]
    ema.update(averaged, [torch.ones(2)], torch.tensor(1))  # decay 2/11: close to the weights at first
    assert float(averaged[0][0]) == pytest.approx(9 / 11)
    ema.update(averaged, [torch.ones(2)], torch.tensor(2))  # decay 3/12
    assert float(averaged[0][0]) == pytest.approx(9 / 11 * 0.25 + 0.75)
    plain = EMA(decay=0.9, warmup=False)
    averaged = [torch.zeros(1)]
    plain.update(averaged, [torch.ones(1)], torch.tensor(1))
    assert float(averaged[0][0]) == pytest.approx(0.1)


def test_ema_averages_a_fit_through_lightning(workdir):
    import lightning as L

    from cnnlab.callbacks import EMA
    from cnnlab.data import DataModule
    from cnnlab.module import ClassifierModule
    from conftest import make_image_folder

    folder = make_image_folder(workdir / "imgs", per_class=8, size=16)
    data = DataModule(str(folder), image_size=16, batch_size=4, num_workers=0, val_fraction=0.25, test_fraction=0)
    ema = EMA(decay=0.99)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema],
    )
    trainer.fit(ClassifierModule("resnet18", num_classes=2, small_input=True, image_size=16), datamodule=data)
    assert ema.updates == 3  # 12 training images, batches of 4: the first step copies, the next two average


@pytest.mark.slow
def test_test_time_augmentation_follows_the_papers_ten_crop_protocol(workdir):
    import torch
    from torchvision.transforms.v2.functional import ten_crop

    from cnnlab.cli import main
    from cnnlab.data import DataModule
    from cnnlab.module import ClassifierModule
    from conftest import make_image_folder

    folder = make_image_folder(workdir / "imgs", per_class=8, size=24)
    data = DataModule(str(folder), image_size=16, crop_pct=0.8, num_workers=0, val_fraction=0, test_fraction=0.25)
    data.hparams.tta = "ten_crop"
    images, _ = next(iter(data.test_dataloader()))
    assert images.shape[-2:] == (20, 20)  # resized to 16 / 0.8 and kept whole: the model cuts the crops
    torch.manual_seed(0)
    module = ClassifierModule("resnet18", num_classes=2, small_input=True, image_size=16, tta="ten_crop").eval()
    with torch.no_grad():
        expected = torch.stack([module(view).softmax(-1) for view in ten_crop(images, [16, 16])]).mean(0)
        assert torch.allclose(module.augmented(images).exp(), expected, atol=1e-6)
        module.hparams.tta = "flip"
        flipped = (module(images).softmax(-1) + module(images.flip(-1)).softmax(-1)) / 2
        assert torch.allclose(module.augmented(images).exp(), flipped, atol=1e-6)
    fit = ["fit", "--config", str(QUICKSTART), f"--data.source={folder}", "--data.crop_pct=0.8", "--data.num_workers=0"]
    assert main([*fit, "--model.tta=ten_crop", "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false"]) == 0


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_two_processes_on_one_node(workdir):
    """Two torchrun agents as two nodes (c10d rendezvous on a loopback port): one MLflow run, one checkpoint,
    the metrics of two processes on one node."""
    import os

    from conftest import free_port

    recipe = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.max_epochs=2",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--data.num_workers=0",
        "--data.image_size=8",
        "--data.val_fraction=0.25",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        "--log_model=false",
    ]
    (workdir / "one").mkdir()
    threads = {"OMP_NUM_THREADS": "1"}  # the same kernels' summation order in both set-ups
    one = cnnlab(*recipe, "--trainer.devices=2", cwd=workdir / "one", env=threads)
    assert one.returncode == 0, one.stderr[-3000:]
    (workdir / "two").mkdir()
    port, torchrun = free_port(), Path(sys.executable).parent / "torchrun"
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    agents = [
        subprocess.Popen(
            [torchrun, *rendezvous, "--rdzv-id=cnnlab-test", "-m", "cnnlab", *recipe, "--trainer.num_nodes=2"],
            cwd=workdir / "two",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}, **threads},
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    histories = []
    for folder in ("one", "two"):
        client = mlflow_client(f"sqlite:///{workdir / folder}/mlruns/mlflow.db")
        run = only_run(client)  # rank 0 alone talks to MLflow
        histories.append(
            [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)]
        )
        assert len(list((workdir / folder).glob("mlruns/*/*/checkpoints/last.ckpt"))) == 1
    assert len(histories[0]) == 2 and histories[1] == pytest.approx(histories[0], abs=1e-6)
