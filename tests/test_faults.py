"""Faults, not bad input: a full disk while checkpointing, the latest state every epoch, resuming or testing a run
that already ended, a model whose files were changed, promotions at the same time, stops."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from cnnlab import UserError
from cnnlab.callbacks.checkpoints import AtomicCheckpointIO, LastCheckpoint
from conftest import QUICKSTART, STORE_VARIABLES, cnnlab, cnnlab_here, mlflow_client, only_run

FAST = ["--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.image_size=8"]  # 8 px: 4x less work


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of its own (mounting needs root: CI has it; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:120]})"
        pytest.fail(message) if os.environ.get("CNNLAB_REQUIRE_SERVICES") else pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_earlier_checkpoint_whole_and_leaves_no_partial_file(small_disk, monkeypatch):
    io, target = AtomicCheckpointIO(), small_disk / "checkpoints" / "best.ckpt"
    good = {"weights": torch.arange(250_000, dtype=torch.float32)}  # 1 MB
    io.save_checkpoint(good, target)
    too_big = {"weights": torch.zeros(1_000_000)}  # 4 MB: more than is left
    with pytest.raises(UserError, match=r"cannot write checkpoint .*best.ckpt: No space left on device") as refused:
        io.save_checkpoint(too_big, target)
    assert "kept best.ckpt" in str(refused.value) and "--ckpt_path last" in str(refused.value)
    # the free-space check passed (a writer filled the disk meanwhile): the write itself fails, with the same care
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 40))
    with pytest.raises(UserError, match="No space left on device"):
        io.save_checkpoint(too_big, target)
    assert [p.name for p in target.parent.iterdir()] == ["best.ckpt"]  # no temporary file left beside it
    assert torch.equal(torch.load(target, weights_only=True)["weights"], good["weights"])


class Falling(LightningModule):
    """A tiny module whose monitored score gets worse every epoch: only the first epoch is ever the best."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("score", -float(self.current_epoch))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)

    val_dataloader = train_dataloader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_last_ckpt_holds_the_latest_epoch_and_every_n_steps_whatever_the_metric_did(tmp_path):
    best = ModelCheckpoint(tmp_path, "best", monitor="score", mode="max")
    saved_steps = []
    last = LastCheckpoint(every_n_steps=3)
    last.save = lambda trainer, save=last.save: (saved_steps.append(trainer.global_step), save(trainer))
    trainer = Trainer(
        max_epochs=3,
        callbacks=[best, last],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Falling())
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["epoch"] == 0
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 2  # not the best epoch's
    assert saved_steps == [3, 4, 6, 8, 9, 12, 12]  # every 3 steps, and each epoch's end (4 steps an epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def wait_for(path_glob, folder: Path, process, seconds: float = 300) -> Path:
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = list(folder.glob(path_glob))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {path_glob} in {seconds} s")


@pytest.mark.slow
def test_a_fit_that_fills_its_disk_ends_failed_in_one_line_and_resumes_from_the_good_checkpoint(workdir):
    disk = workdir / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        message = "cannot mount a tmpfs here"
        pytest.fail(message) if os.environ.get("CNNLAB_REQUIRE_SERVICES") else pytest.skip(message)
    try:
        args = ["fit", "--config", QUICKSTART, "--trainer.max_epochs=2", *FAST, f"--trainer.default_root_dir={disk}"]
        fit = subprocess.Popen(
            [sys.executable, "-m", "cnnlab", *args, "--log_model=false"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        last = wait_for("*/*/checkpoints/last.ckpt", disk, fit)
        while not (last.parent / "best.ckpt").exists() or list(last.parent.glob(".*.tmp")):  # the epoch's both
            time.sleep(0.1)
        used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
        # another writer takes the rest of the volume: no room for a third checkpoint beside the two
        subprocess.run(["mount", "-o", f"remount,size={used + (1 << 20)}", str(disk)], check=True)
        good = {p.name: p.read_bytes() for p in last.parent.iterdir()}
        _, stderr = fit.communicate(timeout=300)
        assert fit.returncode != 0
        lines = [line for line in stderr.splitlines() if "cannot write checkpoint" in line]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert "No space left on device" in lines[0] and "kept best.ckpt, last.ckpt" in lines[0], lines[0]
        assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
        assert {p.name: p.read_bytes() for p in last.parent.iterdir()} == good  # both whole, as they were
        assert torch.load(last, weights_only=True)["epoch"] == 0
        client = mlflow_client()
        assert only_run(client).info.status == "FAILED"

        subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)  # space again: resume
        resumed = cnnlab(*args, "--ckpt_path", "last", "--log_model=false", cwd=workdir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        run = only_run(client)
        assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing_and_testing_keeps_a_runs_status(workdir):
    args = ["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *FAST, "--log_model=false"]
    assert cnnlab(*args, cwd=workdir).returncode == 0
    client = mlflow_client()
    run = only_run(client)
    before = client.get_metric_history(run.info.run_id, "test/acc")

    again = cnnlab(*args, "--ckpt_path", "last", cwd=workdir)
    assert again.returncode == 0 and f"run {run.info.run_id} already FINISHED" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    assert (
        client.get_metric_history(run.info.run_id, "test/acc") == before and only_run(client).info.status == "FINISHED"
    )

    client.set_terminated(run.info.run_id, "FAILED")
    best = next(workdir.glob("mlruns/*/*/checkpoints/best.ckpt"))
    tested = cnnlab("test", "--config", QUICKSTART, *FAST, "--ckpt_path", best, cwd=workdir)
    assert tested.returncode == 0, tested.stderr[-3000:]
    after = only_run(client)
    assert after.info.status == "FAILED" and len(client.get_metric_history(run.info.run_id, "test/acc")) == 2


def tampered_copies(source: Path, into: Path) -> dict[str, Path]:
    """Three copies of a model folder: bytes flipped inside the network, the network cut short, classes edited."""
    copies = {}
    for fault in ("flipped", "truncated", "classes"):
        folder = shutil.copytree(source, into / fault)
        data = next(folder.rglob("cnnlab.json")).parent
        network = data / "network.pt2"
        raw = bytearray(network.read_bytes())
        if fault == "flipped":
            middle = len(raw) // 2
            raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
            network.write_bytes(raw)
        elif fault == "truncated":
            network.write_bytes(raw[: len(raw) // 3])
        else:
            meta = json.loads((data / "cnnlab.json").read_text())
            meta["classes"] = meta["classes"][::-1]
            (data / "cnnlab.json").write_text(json.dumps(meta, indent=2))
        copies[fault] = folder
    return copies


@pytest.fixture
def model_copies(quickstart, tmp_path):
    """The quick-start model copied whole, and three tampered copies of it."""
    cwd, client, run, _ = quickstart
    logged = client.get_logged_model(run.data.tags["cnnlab.model_uri"].removeprefix("models:/"))
    model = shutil.copytree(logged.artifact_location.removeprefix("file://"), tmp_path / "model")
    return cwd, model, tampered_copies(model, tmp_path)


WHICH_FILE = {
    "flipped": "network.pt2 is damaged",
    "truncated": "network.pt2 is damaged",
    "classes": "cnnlab.json was changed",
}


@pytest.mark.slow
def test_every_consumer_refuses_a_changed_model_in_one_line_and_loads_the_untouched_one(
    model_copies, tmp_path, workdir
):
    import mlflow.pyfunc
    from PIL import Image

    from cnnlab import load

    cwd, model, copies = model_copies
    image = tmp_path / "seven.png"
    Image.new("RGB", (8, 8), "white").save(image)
    assert load.model(str(model)).digest == hashlib.sha256(next(model.rglob("cnnlab.json")).read_bytes()).hexdigest()
    assert mlflow.pyfunc.load_model(str(model)) is not None
    for fault, folder in copies.items():
        for command in (
            ["predict", folder, image],
            ["export", folder, "--format", "onnx", "--out", tmp_path / "x"],
            ["serve", folder],  # refused before a worker starts
        ):
            refused = cnnlab_here(*command, cwd=tmp_path)
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode != 0 and len(lines) == 1 and WHICH_FILE[fault] in lines[0], (
                fault,
                command,
                lines,
            )
            assert "sha256" in lines[0] and "recorded" in lines[0]
        with pytest.raises(UserError, match=WHICH_FILE[fault]):  # a distillation teacher, model.pretrained
            load.model(str(folder))
        with pytest.raises(ValueError, match=WHICH_FILE[fault]):  # the pyfunc, in plain MLflow
            mlflow.pyfunc.load_model(str(folder))


@pytest.mark.slow
def test_the_gate_refuses_a_changed_registered_model(model_copies):
    from cnnlab import store
    from cnnlab.registry import register_model

    cwd, _, copies = model_copies
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlruns/mlflow.db"}
    name = f"tampered-{uuid.uuid4().hex[:8]}"
    with store.run("tampered", {}, uri=env["MLFLOW_TRACKING_URI"]) as run:
        model_uri = store.log_model(run.client, run.id, copies["flipped"])
        register_model(run.client, name, model_uri, run.id, {})
    refused = cnnlab_here("promote", name, cwd=cwd, env=env)
    assert refused.returncode != 0 and "network.pt2 is damaged" in refused.stderr, refused.stdout + refused.stderr
    assert "champion" not in mlflow_client(env["MLFLOW_TRACKING_URI"]).get_registered_model(name).aliases


@pytest.mark.slow
def test_two_promotions_at_once_end_with_one_champion_that_beat_the_other(quickstart):
    from cnnlab.registry import register_model

    cwd, client, run, _ = quickstart
    name = f"race-{uuid.uuid4().hex[:8]}"
    for _ in range(2):  # two versions of one model: equal scores, so the second must beat the first by min-delta
        register_model(client, name, run.data.tags["cnnlab.model_uri"], run.info.run_id, {}, alias=None)
    promotions = [
        subprocess.Popen(
            [sys.executable, "-m", "cnnlab", "promote", name, "--version", version, "--min-delta", "0.001"],
            cwd=cwd,
            env={k: v for k, v in os.environ.items() if k not in STORE_VARIABLES},  # the quick start's own store
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in ("1", "2")
    ]
    outputs = [p.communicate(timeout=300) for p in promotions]
    codes = sorted(p.returncode for p in promotions)
    assert codes == [0, 1], outputs
    winner = str(client.get_model_version_by_alias(name, "champion").version)
    loser = "2" if winner == "1" else "1"
    assert client.get_model_version(name, winner).tags["promotion.decision"] == "promoted"
    lost = client.get_model_version(name, loser).tags
    assert lost["promotion.decision"] == "refused" and lost["promotion.champion_version"] == winner  # it saw the winner
    out = outputs[int(loser) - 1][0]
    assert f"refused: v{loser} does not beat the champion v{winner}" in out, out
    assert "promotion.lease" not in client.get_registered_model(name).tags  # released
