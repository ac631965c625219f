"""The one module that speaks MLflow: which store, its clients, the runs cnnlab opens outside Lightning's
logger, what a model URI names, and reading a model artifact (or a checkpoint file, as data) from it.

Every command takes a model as a URI: a run id or `runs:/RUN_ID`, `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
a logged-model id (`m-...` or `models:/m-...`), a local model folder (`cnnlab export --out`), or a Lightning
checkpoint (`.ckpt`). `resolve` turns it into a `ModelRef`; `load` an artifact into a `Network`
(cnnlab_model), read from the artifact alone (a checkpoint becomes a Network above, in cnnlab.load). Nothing
here changes MLflow's global tracking or registry URI, and nothing here imports training.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab import UserError
from cnnlab.cnnlab_model import (
    META_FILE,
    Network,
    data_folder,
    default_crop_pct,
    load_network,
    recorded_digest,
    verify,
)
from cnnlab.sources import recorded_data

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

URI_FORMS = (
    "a run id or runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION, a logged-model id (m-...), "
    "a model folder written by `cnnlab export`, or a .ckpt file"
)


def absolute_sqlite(url: str, what: str = "MLFLOW_TRACKING_URI") -> str:
    """A sqlite URL made absolute, its folder made (MLflow caches one store per URI string, and other processes
    open Optuna's storage from other folders); any other URL as it is."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return url
    path = Path(url[len("sqlite:///") :]).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} {url}: cannot make its folder ({err.strerror}). Give a writable path.") from None
    return f"sqlite:///{path}"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's sqlite store (its folder made on first use)."""
    return absolute_sqlite(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def client(uri: str | None = None):
    """A client on one store (the project's by default), for tracking and registry alike."""
    from mlflow import MlflowClient

    uri = uri or default_tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def experiment_id(store, name: str = "cnnlab") -> str:
    """The experiment's id (made if new), marked as model training so the MLflow UI opens on that view."""
    found = store.get_experiment_by_name(name)
    experiment = found.experiment_id if found else store.create_experiment(name)
    if not found or found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        store.set_experiment_tag(experiment, *EXPERIMENT_KIND)
    return experiment


@dataclass
class Run:
    """A run opened by `run`: its client and id, and the status the body gives it (else the way it ended decides)."""

    client: object
    id: str
    status: str | None = None


@contextlib.contextmanager
def run(
    name: str | None = None,
    tags: dict | None = None,
    experiment: str = "cnnlab",
    run_id: str | None = None,
    uri: str | None = None,
) -> Iterator[Run]:
    """An MLflow run for the body (a new one, or `run_id` continued), ended with the status the body set, else
    FINISHED, FAILED on an error, KILLED on Ctrl-C, SIGTERM or exit: the runs of export, compress, compare, tune."""
    store = client(uri)
    if run_id:
        store.update_run(run_id, status="RUNNING")
    else:
        run_id = store.create_run(experiment_id(store, experiment), run_name=name, tags=tags or {}).info.run_id
    handle = Run(store, run_id)
    try:
        yield handle
    except (KeyboardInterrupt, SystemExit):
        handle.status = handle.status or "KILLED"
        raise
    except BaseException:
        handle.status = handle.status or "FAILED"
        raise
    finally:
        store.set_terminated(run_id, handle.status or "FINISHED")


@dataclass
class ModelRef:
    """What a model URI names now: `artifact` is the MLflow artifact URI (or local path) of the model."""

    uri: str
    kind: str  # version | logged | run | folder | checkpoint
    artifact: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    tags: dict = field(default_factory=dict)  # a registered version's tags


def resolve(uri: str) -> ModelRef:
    """A model URI to what it names now (an alias is read at this moment)."""
    from mlflow.exceptions import MlflowException

    path = Path(uri)
    if path.is_file() and path.suffix == ".ckpt":
        return ModelRef(uri, "checkpoint", str(path.resolve()))
    if path.is_dir() and (path / "MLmodel").is_file():
        return ModelRef(uri, "folder", str(path.resolve()), name=path.name)
    if path.suffix == ".ckpt" or (path.is_absolute() or uri.startswith(".")) and not path.exists():
        raise UserError(f"'{uri}': no such file or folder. A model is {URI_FORMS}.")
    store = client()
    try:
        if uri.startswith("models:/") and not uri[len("models:/") :].startswith("m-"):
            name, _, alias = uri[len("models:/") :].partition("@")
            if alias:
                version = store.get_model_version_by_alias(name, alias)
            else:
                name, _, number = name.partition("/")
                if not number.isdigit():
                    raise UserError(f"'{uri}': write models:/NAME/VERSION (a number) or models:/NAME@ALIAS.")
                version = store.get_model_version(name, number)
            artifact = f"models:/{version.model_id}" if getattr(version, "model_id", None) else version.source
            return ModelRef(
                uri, "version", artifact, name, str(version.version), alias or None, version.run_id, version.tags or {}
            )
        model_id = uri.removeprefix("models:/")
        if model_id.startswith("m-"):
            logged = store.get_logged_model(model_id)
            return ModelRef(uri, "logged", f"models:/{model_id}", logged.name, run_id=logged.source_run_id)
        run_id = uri[len("runs:/") :].split("/")[0] if uri.startswith("runs:/") else uri
        run = store.get_run(run_id)
    except MlflowException as err:
        known = ", ".join(m.name for m in store.search_registered_models(max_results=20)) or "none"
        raise UserError(
            f"'{uri}' is not a model in {default_tracking_uri()} ({str(err).splitlines()[0][:160]}). "
            f"A model is {URI_FORMS}. Registered models: {known} (`cnnlab models` lists them)."
        ) from None
    logged = run.data.tags.get("cnnlab.model_uri")
    if not logged:
        raise UserError(
            f"run '{run_id}' logged no model (its fit did not finish, or ran with --log_model false). "
            "Fit the recipe again, or pass its checkpoint (.ckpt)."
        )
    return ModelRef(uri, "run", logged, run.info.run_name, run_id=run_id)


def download(ref: ModelRef, into: str) -> Path:
    """The model's folder on this machine (a local folder as it is)."""
    import mlflow.artifacts

    if ref.kind == "folder":
        return Path(ref.artifact)
    location = ref.artifact
    if location.startswith("models:/m-"):  # a logged model: its artifacts' own location, read with our client
        location = client().get_logged_model(location[len("models:/") :]).artifact_location
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=into, tracking_uri=default_tracking_uri())
    )


def check(uri: str) -> dict:
    """What a model URI names, described (its cnnlab.json, or a checkpoint's equivalent) once every file of the
    artifact is checked (`verify`), without loading it: a changed or damaged file is a UserError naming it. What a
    server reads before its workers load the model."""
    ref = resolve(uri)
    if ref.kind == "checkpoint":
        return checkpoint_meta(read_checkpoint(ref.artifact))
    with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        model = download(ref, tmp)
        meta_file = _meta_file(uri, data_folder(model))
        try:
            verify(meta_file.parent, recorded_digest(model))
        except (ValueError, OSError) as err:
            raise UserError(f"'{uri}': {err}.") from None
        return json.loads(meta_file.read_text())


def _meta_file(uri: str, folder: Path) -> Path:
    if not (folder / META_FILE).is_file():
        raise UserError(f"'{uri}' is an MLflow model but not a cnnlab model (no {META_FILE}).")
    return folder / META_FILE


def load(
    uri: str | ModelRef,
    threads: int | None = None,
    device: str = "cpu",
    runtime: str | None = None,
    unflatten: bool = False,
    program: bool = False,
) -> Network:
    """The model artifact a URI (or its resolved ModelRef) names, on its own runtime (or `runtime`, see
    load_network; `program`: a fit's torch program, not its CPU twin), from the artifact alone (no recipe, no training data). A checkpoint is no artifact:
    cnnlab.load.model takes those too."""
    ref = uri if isinstance(uri, ModelRef) else resolve(uri)
    if ref.kind == "checkpoint":
        raise UserError(f"'{ref.uri}' is a checkpoint, not a model artifact: load it with cnnlab.load.model.")
    with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        model = download(ref, tmp)
        folder = _meta_file(ref.uri, data_folder(model)).parent
        try:
            network = load_network(folder, threads, device, runtime, recorded_digest(model), unflatten, program)
        except (ValueError, OSError) as err:
            raise UserError(f"'{ref.uri}': {err}.") from None
    network.source, network.name, network.version, network.alias = ref.uri, ref.name, ref.version, ref.alias
    network.min_confidence = min_confidence(ref)
    return network


MIN_CONFIDENCE = "min_confidence"  # a registered version's tag: the top probability below which it answers unsure


def min_confidence(ref: ModelRef) -> float:
    """The threshold a registered version carries (its `min_confidence` tag), 0 when it carries none."""
    value = ref.tags.get(MIN_CONFIDENCE)
    if value is None:
        return 0.0
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not 0.0 <= threshold <= 1.0:
        raise UserError(
            f"{ref.name} v{ref.version}: its tag {MIN_CONFIDENCE}={value!r} is not a probability from 0 to 1. "
            f"Set it again (`cnnlab register ... --min-confidence P`, or the version's tags in the MLflow UI)."
        )
    return threshold


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    """A checkpoint's contents as data only (torch's weights_only): a file that would run code is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist. Pass the best.ckpt or last.ckpt of a fit.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{what} '{path}' holds Python objects beyond tensors and plain data, which could run code "
            f"when loaded; it was not loaded ({str(err).splitlines()[0][:160]}). Load only checkpoints "
            "you trust, saved by a cnnlab fit."
        ) from None
    except Exception as err:
        raise UserError(
            f"{what} '{path}' is not a readable PyTorch checkpoint ({str(err).splitlines()[0][:160]}): "
            "empty, truncated or another kind of file. Pass the best.ckpt or last.ckpt of a fit."
        ) from None


def checkpoint_meta(saved: dict) -> dict:
    """What a cnnlab.json would say of a checkpoint read by read_checkpoint: classes, input size, crop, mean, std
    and the data it was trained on, from its recorded hyperparameters."""
    hparams, data = saved.get("hyper_parameters") or {}, saved.get("datamodule_hyper_parameters") or {}
    size = hparams.get("image_size")
    return {
        "classes": list(hparams.get("classes") or [str(i) for i in range(hparams.get("num_classes", 0))]),
        "image_size": size,
        "crop_pct": data.get("crop_pct") or default_crop_pct(size),
        "interpolation": data.get("interpolation"),
        "mean": list(hparams.get("mean") or ()),
        "std": list(hparams.get("std") or ()),
        "runtime": "torch",
        "format": "checkpoint",
        "sha256": "",
        "data": recorded_data(data),
    }


def log_model(store, run_id: str, folder: Path, name: str = "model", tags: dict | None = None) -> str:
    """Log a saved MLflow model folder as a logged model of the run; its `models:/m-...` URI."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run = store.get_run(run_id)
    logged = store.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    store.log_model_artifacts(logged.model_id, str(folder))
    store.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    store.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run page lists it
    store.set_tag(run_id, "cnnlab.model_uri", f"models:/{logged.model_id}")
    return f"models:/{logged.model_id}"
