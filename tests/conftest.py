"""Shared fixtures: every test works in its own folder with its own MLflow store, and never downloads."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

os.environ.update(
    HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1"
)
STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
for _variable in STORE_VARIABLES:
    os.environ.pop(_variable, None)


# The files that take minutes, longest first (a full run's --durations). The test processes take whole files in
# collection order (the Makefile's PYTEST): the long ones start first and the short ones fill in at the end, so
# that no process is left alone with a long file while the other waits.
LONGEST_FIRST = (
    "test_tune.py",
    "test_training.py",
    "test_registry.py",
    "test_gpu_paths.py",
    "test_compress.py",
    "test_serve.py",
    "test_gpu_script.py",
    "test_trust.py",
    "test_bad_input.py",
    "test_tune_front.py",
    "test_wheel.py",
    "test_faults.py",
    "test_compare.py",
)


def pytest_collection_modifyitems(items):
    """A test that needs the trained quick-start model (directly or through another fixture) is slow too. The
    files of LONGEST_FIRST come first, in its order; each file's tests keep theirs."""
    for item in items:
        if "quickstart" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # test processes share the cores, set before torch is imported and
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by their subprocesses: a torch thread each,
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # and no pool of compiling processes


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One cache for the session's test processes (cnnlab writes its entries atomically)."""
    os.environ["CNNLAB_CACHE"] = str(shared_folder(tmp_path_factory) / "cache")


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Each test leaves its process's signal handlers as it found them. A handler left behind (torch sets one for
    SIGCHLD with a DataLoader's first workers) runs at every later child's exit; after the compress tests had run
    in the same process (OpenVINO's CPU plugin sets signal stacks), its delivery killed the process with SIGSEGV."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh project folder: `mlruns/` (the default store) lands here."""
    monkeypatch.chdir(tmp_path)
    for variable in STORE_VARIABLES:  # mlflow.set_tracking_uri() and set_registry_uri() export them
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


@pytest.fixture
def small(workdir):
    """The quick-start recipe at 8 px, 3 short epochs, no loader workers (a study's trials): seconds each."""
    import yaml

    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["trainer"].update(max_epochs=3, limit_train_batches=8)
    recipe["data"].update(image_size=8, num_workers=0)
    (workdir / "small.yaml").write_text(yaml.safe_dump(recipe))
    return workdir / "small.yaml"


def cnnlab(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, in a subprocess, on the store of `cwd` unless `env` names another."""
    base = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}  # mlflow exports them in-process
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def cnnlab_here(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same command in this process, for commands that train nothing: it saves a subprocess's ~10 s of
    imports. Its own store, working folder and output, as `cnnlab` has; an exception fails the test."""
    import contextlib
    import io

    from cnnlab.cli import main

    saved_cwd, saved_env, out, err = os.getcwd(), dict(os.environ), io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        for variable in STORE_VARIABLES:
            os.environ.pop(variable, None)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(map(str, args)))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# Headless Chromium as CI runs it: no sandbox (root in a container), nothing fetched from the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def require(variable: str, what: str) -> str:
    """A service address that .ci/services exports; CI (CNNLAB_REQUIRE_SERVICES=1) fails without it."""
    value = os.environ.get(variable)
    if not value:
        message = f"{what} is not running: `source .ci/services` starts it ({variable})"
        pytest.fail(message) if os.environ.get("CNNLAB_REQUIRE_SERVICES") else pytest.skip(message)
    return value


def shared_folder(tmp_path_factory) -> Path:
    """A folder this session's test processes share (xdist gives each its own temp folder below a common one)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def start_quickstart(folder: Path) -> None:
    """The README's main job, registered as `digits`, started in the background in `folder` by the first test
    process to ask; its exit code lands in `folder/code` when it ends."""
    folder.mkdir(exist_ok=True)
    try:
        os.close(os.open(folder / "started", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    (folder / "fit").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    fit = shlex.join(["timeout", "1200", sys.executable, "-m", "cnnlab", "fit", "--config", str(QUICKSTART)])
    script = (
        f"cd fit && {fit} --register digits > ../stdout 2> ../stderr; echo $? > ../code.part; mv ../code.part ../code"
    )
    STARTED.append(subprocess.Popen(["sh", "-c", script], cwd=folder, env=env, start_new_session=True))


STARTED: list[subprocess.Popen] = []


@pytest.fixture(scope="session", autouse=True)
def _quickstart_early(request, tmp_path_factory, _cache):
    """The quick-start fit starts with the session, beside the first tests, where a test will need it. One test
    process stops it if its session ends first; of several, another may still need it (it ends in 20 minutes)."""
    if any("quickstart" in getattr(item, "fixturenames", ()) for item in request.session.items):
        start_quickstart(shared_folder(tmp_path_factory) / "quickstart")
    yield
    for started in STARTED:
        if started.poll() is None and not os.environ.get("PYTEST_XDIST_WORKER"):
            os.killpg(started.pid, signal.SIGKILL)


def moved(db: Path, old: str, new: str) -> None:
    """An MLflow sqlite store copied from `old` to `new`: every text that names the old folder names the new."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")').fetchall()]:
                con.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                    (old, new, old),
                )


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The README's main job, registered as `digits`: fitted once per session and copied into a folder of this
    test process, whose store it may change: (folder, client, run, the fit's CompletedProcess)."""
    shared = shared_folder(tmp_path_factory) / "quickstart"
    start_quickstart(shared)
    deadline = time.time() + 1200
    while not (shared / "code").exists() and time.time() < deadline:
        time.sleep(1)
    assert (shared / "code").exists(), "the quick-start fit took over 20 minutes"
    for started in STARTED:  # reaped by the test process that started it
        started.wait()
    stdout, stderr = (shared / "stdout").read_text(), (shared / "stderr").read_text()
    result = subprocess.CompletedProcess(["cnnlab", "fit"], int((shared / "code").read_text()), stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    cwd = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(shared / "fit", cwd, dirs_exist_ok=True)
    moved(cwd / "mlruns" / "mlflow.db", str(shared / "fit"), str(cwd))
    client = mlflow_client(f"sqlite:///{cwd}/mlruns/mlflow.db")
    return cwd, client, only_run(client), result


def mlflow_client(uri: str | None = None):
    from mlflow import MlflowClient

    from cnnlab.store import default_tracking_uri

    uri = uri or default_tracking_uri()
    return MlflowClient(uri, registry_uri=uri)  # never a registry URI left global by an earlier in-process test


def only_run(client, experiment: str = "cnnlab"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size: int = 20) -> Path:
    """A tiny ImageFolder of random RGB images, distinct per class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.integers(0, 60, (size, size, 3)) + 90 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list, cwd: Path, env: dict, log: Path, stop: int = signal.SIGKILL, seconds: float = 180):
    """A `cnnlab serve` command (without --port) on a free loopback port, in its own session, once /health
    answers (its output in `log`): yields (url, process). Then `stop` goes to the whole session, so LitServe's
    workers end with the server, unless the test ended it already."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*map(str, command), "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            assert process.poll() is None, Path(log).read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, stop)
            process.wait(timeout=60)


def processes(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat field (after the name) equals value: 1 the parent, 3 the session."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def write_shard(path, first: int, n: int, mode: str = "w:gz"):
    """n samples keyed first.., class i % 2, each image a flat grey of value i (so it names its sample)."""
    with tarfile.open(path, mode) as tar:
        for i in range(first, first + n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def on_store(monkeypatch, cwd: Path) -> None:
    """This process on the quick start's store (an earlier test's mlflow.set_tracking_uri may have set another)."""
    import mlflow

    uri = f"sqlite:///{cwd}/mlruns/mlflow.db"
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(variable, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def mutated(body: bytes, rng) -> bytes:
    """A body with a few bytes flipped, cut or inserted (the fuzz tests' mutation)."""
    body = bytearray(body)
    for _ in range(rng.integers(1, 8)):
        k = int(rng.integers(0, len(body)))
        choice = rng.integers(0, 3)
        if choice == 0:
            body[k] = int(rng.integers(0, 256))
        elif choice == 1:
            del body[k : k + int(rng.integers(1, 16))]
        else:
            body[k:k] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    return bytes(body)
