"""Child `cnnlab fit` processes, for tune and compare: one per recipe, logging into an MLflow run made for
it beforehand, ended with the process that started them (by any signal, SIGKILL included), and described in one
line when they fail."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def apply(recipe: dict, overrides: dict) -> dict:
    """The recipe with dotted keys set (`model.optimizer.init_args.lr`); a whole value (e.g. a class_path choice) first, its inner keys after."""
    out = copy.deepcopy(recipe)
    for key in sorted(overrides, key=lambda k: k.count(".")):
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
                continue
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = overrides[key]
        else:
            node[parts[-1]] = overrides[key]
    return out


def fit(
    recipe: dict,
    run_id: str,
    experiment: str,
    tracking_uri: str,
    name: str = "recipe",
    extra: list[str] = (),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Train a recipe in its own `cnnlab fit` process, logging into an MLflow run made beforehand (the way
    tuning trials and comparisons nest their runs under a parent)."""
    from cnnlab.tracking import LOGGER

    runnable = apply(
        recipe,
        {"trainer.logger": {"class_path": LOGGER, "init_args": {"experiment_name": experiment, "run_id": run_id}}},
    )
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(runnable, sort_keys=False))
        # Its own process group, ended with ours (end_all), and told by the kernel if we die (SIGKILL).
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnnlab",
                "fit",
                "--config",
                str(path),
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_end_with_parent,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri, **(env or {})},
        )
        _CHILDREN.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            _CHILDREN.discard(child)
        return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def why_failed(proc: subprocess.CompletedProcess) -> str:
    """One line on why a fit process failed: its last error line, and the signal that ended it, if one did."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    error = next(
        (
            line
            for line in reversed(lines)
            if line.startswith("cnnlab: ") or "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]
        ),
        lines[-1] if lines else "",
    )[:1000]
    if proc.returncode < 0:  # a crash or the kernel (SIGSEGV, SIGKILL), not a Python error
        ended = f"the fit was ended by {signal.Signals(-proc.returncode).name}"
        return f"{ended}; its last line: {error}" if error else ended
    return error or f"the fit exited with code {proc.returncode}"


_CHILDREN: set[subprocess.Popen] = set()
TEMP_PREFIX = "cnnlab-fit-"


def remove_stale_temp() -> None:
    """Temporary recipe folders of processes that died without cleaning up (killed with SIGKILL)."""
    import shutil

    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = folder.name[len(TEMP_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _end_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def signal_all(signum: int, group: bool = False) -> None:
    """Send a signal to every fit process this process started; with `group`, to their workers too (else each
    fit ends its own)."""
    send = os.killpg if group else os.kill
    for child in list(_CHILDREN):
        with contextlib.suppress(ProcessLookupError):
            send(child.pid, signum)


def end_all(grace: float = 30) -> None:
    """SIGTERM every fit process this process started (and their workers), SIGKILL what is left after `grace`."""
    signal_all(signal.SIGTERM, group=True)
    for child in list(_CHILDREN):
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
