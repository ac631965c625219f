"""`cnnlab reproduce MODEL_URI`: train a registered version (or a run's model) again from what its run recorded
(the recipe, its seed, the thread count) and compare the test metrics.

Before any training, the recipe's data is read and its fingerprint compared with the recorded one: a changed
split is refused in one line naming it. Packages that differ from the run's `system/requirements.txt` are
warned about. The new fit is a run of its own, in the original's experiment, tagged `cnnlab.reproduces`; the
version gets `reproduce.status` (exact, within, differs), `reproduce.delta.METRIC` and `reproduce.run_id`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib.metadata import distributions
from pathlib import Path

import yaml

from cnnlab import UserError, store

# the recipe's own keys a reproduction resets: no resume, no registration, the model logged and tested
RESET = ["--ckpt_path=null", "--register=null", "--log_model=true", "--test_after_fit=true"]


def reproduce(uri: str, /, tolerance: float = 0.01) -> int:
    """Train a model again from what its run recorded and compare its test metrics; 0 when every one is within
    the tolerance, 1 when one is not.

    Args:
        uri: models:/NAME/VERSION, models:/NAME@ALIAS, a run id or runs:/RUN_ID
        tolerance: the largest |difference| of any test metric (accuracy, F1, loss, ECE ...) still reproduced
    """
    from mlflow.exceptions import MlflowException

    if tolerance < 0:
        raise UserError(f"--tolerance {tolerance}: give the largest difference still accepted, 0 or more.")
    ref = store.resolve(uri)
    if ref.kind not in ("version", "run", "logged") or not ref.run_id:
        raise UserError(f"'{uri}' names no run to reproduce: give models:/NAME/VERSION or the run id of a fit.")
    client = store.client()
    run = client.get_run(ref.run_id)
    with tempfile.TemporaryDirectory(prefix="cnnlab-reproduce-") as tmp:
        try:
            recipe_file = Path(client.download_artifacts(ref.run_id, "recipe.yaml", tmp))
        except (MlflowException, OSError):
            raise UserError(f"run {ref.run_id} recorded no recipe.yaml: it cannot be trained again.") from None
        recipe = yaml.safe_load(recipe_file.read_text())
        check_data(recipe, run.data.tags)
        warn_packages(client, ref.run_id, tmp)
        threads = run.data.tags.get("sys.torch_threads")
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        else:
            print("cnnlab: the run recorded no thread count; training with this machine's default", file=sys.stderr)
        tags = {"cnnlab.reproduces": ref.run_id}
        command = [sys.executable, "-m", "cnnlab", "fit", "--config", str(recipe_file), *RESET]
        command += ["--trainer.logger.init_args.run_id=null", f"--trainer.logger.init_args.tags={json.dumps(tags)}"]
        command += [f"--trainer.logger.init_args.tracking_uri={store.default_tracking_uri()}"]
        command += [f"--trainer.logger.init_args.run_name=reproduce-{run.info.run_name or ref.run_id[:8]}"]
        print(f"cnnlab: training run {ref.run_id} ({run.info.run_name}) again, seed {recipe.get('seed_everything')}, "
              f"{threads or 'default'} threads", flush=True)  # fmt: skip
        if subprocess.run(command, env=env).returncode != 0:
            raise UserError(f"the reproduction of run {ref.run_id} failed (its fit's error is above).")
    again = client.search_runs(
        [run.info.experiment_id], f"tags.`cnnlab.reproduces` = '{ref.run_id}'", order_by=["attributes.start_time DESC"]
    )[0]
    return compare(client, ref, run, again, tolerance)


def check_data(recipe: dict, tags: dict) -> None:
    """The recipe's data, read now, against the fingerprint the run recorded: a UserError naming each split that
    differs (or that is new or gone)."""
    from cnnlab.data import DataModule

    recorded = tags.get("cnnlab.data.fingerprint")
    if not recorded:
        print("cnnlab: the run recorded no data fingerprint; the data is not checked", file=sys.stderr)
        return
    data = {k: v for k, v in (recipe.get("data") or {}).items() if k not in ("classes", "num_classes")}
    datamodule = DataModule(**data)
    now = datamodule.describe()
    if now["fingerprint"] == recorded:
        return
    sizes = json.loads(tags.get("cnnlab.data.sizes") or "{}")
    before = dict(zip(sorted(sizes), recorded.split("-")))
    after = dict(zip(sorted(now["sizes"]), now["fingerprint"].split("-")))
    differs = [
        f"{split} ({sizes.get(split, 0)} images recorded, {now['sizes'].get(split, 0)} now)"
        for split in sorted({*before, *after})
        if before.get(split) != after.get(split)
    ] or ["its file list"]
    raise UserError(
        f"data.source='{datamodule.source}' is not the data the run trained on: {', '.join(differs)} differ from "
        f"the recorded fingerprint {recorded}. Restore that data to reproduce the run."
    )


def warn_packages(client, run_id: str, tmp: str) -> None:
    """Say which installed packages differ from the run's system/requirements.txt."""
    from mlflow.exceptions import MlflowException

    try:
        frozen = Path(client.download_artifacts(run_id, "system/requirements.txt", tmp)).read_text().split()
    except (MlflowException, OSError):
        print("cnnlab: the run recorded no requirements; package versions are not checked", file=sys.stderr)
        return
    then = dict(line.split("==", 1) for line in frozen if "==" in line)
    now = {d.metadata["Name"].lower(): d.version for d in distributions() if d.metadata["Name"]}
    differs = [
        f"{name} {now.get(name.lower(), 'missing')} (run: {v})"
        for name, v in then.items()
        if now.get(name.lower()) != v
    ]
    if differs:
        shown = ", ".join(differs[:12]) + (f" and {len(differs) - 12} more" if len(differs) > 12 else "")
        print(f"cnnlab: warning: {len(differs)} packages differ from the run's: {shown}", file=sys.stderr)


def compare(client, ref, run, again, tolerance: float) -> int:
    """Both runs' test metrics side by side; the version (or the original run) tagged with the outcome."""
    ours = {k: v for k, v in run.data.metrics.items() if k.startswith("test/") and k.count("/") == 1}
    theirs = again.data.metrics
    missing = sorted(k for k in ours if k not in theirs)
    deltas = {k: theirs[k] - v for k, v in ours.items() if k in theirs}
    worst = max((abs(d) for d in deltas.values()), default=0.0)
    status = "differs" if missing or worst > tolerance else ("exact" if worst == 0 else "within")
    print(f"{'metric':<22} {'recorded':>10} {'again':>10} {'delta':>10}")
    for key, delta in sorted(deltas.items()):
        print(f"{key:<22} {ours[key]:>10.4f} {theirs[key]:>10.4f} {delta:>+10.2e}")
    record = {
        "reproduce.status": status,
        "reproduce.run_id": again.info.run_id,
        "reproduce.tolerance": str(tolerance),
        "reproduce.time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{f"reproduce.delta.{k}": f"{d:.3g}" for k, d in deltas.items()},
    }
    for key, value in record.items():
        if ref.kind == "version":
            client.set_model_version_tag(ref.name, ref.version, key, value)
        else:
            client.set_tag(ref.run_id, key, value)
    what = f"{ref.name} v{ref.version}" if ref.kind == "version" else f"run {ref.run_id}"
    if status == "differs":
        why = f"missing {', '.join(missing)}" if missing else f"largest |delta| {worst:.3g} > tolerance {tolerance}"
        print(f"not reproduced: {what} ({why}); run {again.info.run_id}")
        return 1
    print(f"reproduced: {what} ({status}, largest |delta| {worst:.3g}); run {again.info.run_id}")
    return 0
