"""The MLflow model registry: register a run's model, promote it only through an evaluation gate, list models.

Aliases, not stages: a new version becomes `challenger`; `champion` moves only when the candidate beats the
current champion on the same held-out data (or with --force, which is recorded). Every decision is written
onto the candidate version as tags and a line of its description.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from cnnlab import UserError, load, store
from cnnlab.calibration import selective
from cnnlab.evaluate import METRICS, class_drops, logits, scores

CHALLENGER, CHAMPION = "challenger", "champion"
LOWER_IS_BETTER = {"test/loss"}


def register_model(
    client,
    name: str,
    model_uri: str,
    run_id: str | None,
    tags: dict,
    description: str = "",
    alias: str | None = CHALLENGER,
):
    """A new version of NAME (made if new) from a logged model (`models:/m-...`), tagged; `alias` moved to it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model_id = model_uri.removeprefix("models:/")
    # The logged model's own location: a models:/ source would be looked up on MLflow's global store.
    location = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(
        name,
        source=location,
        run_id=run_id,
        model_id=model_id,
        tags={k: str(v) for k, v in tags.items()},
        description=description,
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def register(run_id: str, name: str):
    """A new version of NAME from the run's logged model, tagged with recipe, data and test metrics."""
    from mlflow.exceptions import MlflowException

    client = store.client()
    ref = store.resolve(run_id)
    if ref.kind != "run":
        raise UserError(
            f"'{run_id}' is not a run id: `cnnlab register` takes the run of a fit (the MLflow UI lists them)."
        )
    run, model_uri = client.get_run(ref.run_id), ref.artifact
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    tags = {
        "recipe": run.info.run_name or "",
        "recipe_uri": f"runs:/{run_id}/recipe.yaml",
        "run_id": run_id,
        "data.source": run.data.tags.get("cnnlab.data.source", ""),
        "data.fingerprint": run.data.tags.get("cnnlab.data.fingerprint", ""),
        **{k: v for k, v in logged.tags.items() if k.startswith("cnnlab.")},
        **{k: f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test/") and k.count("/") == 1},
    }
    try:
        recipe = Path(client.download_artifacts(run_id, "recipe.yaml")).read_text()
    except (MlflowException, OSError):
        recipe = "(not logged)\n"
    return register_model(
        client,
        name,
        model_uri,
        run_id,
        tags,
        f"Trained by run {run_id} ({run.info.run_name}). Recipe:\n\n```yaml\n{recipe}```\n",
    )


def _version(client, name: str, version: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if version:
            return client.get_model_version(name, str(version))
        try:
            return client.get_model_version_by_alias(name, CHALLENGER)
        except MlflowException:
            return max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    except (MlflowException, ValueError):
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise UserError(
            f"no version {version or '(latest)'} of a registered model '{name}'. Registered models: "
            f"{known}. `cnnlab models` lists them."
        ) from None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_run(
    run_id: str, *, name: str, min_confidence: float | None = None, target_precision: float | None = None
) -> int:
    """Register a run's model as a new version of NAME (alias challenger).

    Args:
        run_id: the MLflow run id of a finished fit
        name: the registered model's name
        min_confidence: the version's default threshold (its min_confidence tag): `serve` and `predict` answer
            unsure below this top probability
        target_precision: set min_confidence to the lowest threshold whose answers were this precise on the
            model's validation split (recorded in the model)
    """
    from cnnlab.calibration import answer_threshold

    threshold = None
    if min_confidence is not None or target_precision is not None:
        threshold, why = answer_threshold(store.check(run_id), 0.0, min_confidence, target_precision)
    version = register(run_id, name)
    if threshold is not None:
        store.client().set_model_version_tag(name, version.version, store.MIN_CONFIDENCE, str(threshold))
        print(f"v{version.version} answers unsure below a top probability of {threshold} ({why})")
    print(
        f"registered {name} v{version.version} from run {run_id} (alias challenger); "
        f"promote it with `cnnlab promote {name}`"
    )
    return 0


def promote(
    name: str,
    version: str | None = None,
    metric: Literal[METRICS] = "test/acc",
    min_delta: float = 0.0,
    max_class_drop: float = 0.05,
    min_confidence: float | None = None,
    data: str | None = None,
    force: bool = False,
) -> int:
    """Move the `champion` alias to a version only if it beats the champion by min_delta and no class's recall falls
    by more than max_class_drop; 0 when promoted. The gate loads each version exactly as `cnnlab serve` does (same
    file, same runtime) and records which.

    Args:
        name: the registered model's name
        version: the candidate (the `challenger` alias, else the latest)
        metric: the gate's metric
        min_delta: how much better the candidate must be
        max_class_drop: refuse when any class's recall falls more than this below the champion's, beyond what
            chance on that class's images explains (1.645 paired standard errors; 1 turns it off)
        min_confidence: print both versions' coverage and accuracy when answering only at or above this top
            probability (default: the candidate's min_confidence tag)
        data: evaluate on this source's test split (the data the model records)
        force: promote even if worse (recorded); also for a rollback
    """
    from cnnlab.data import labelled

    if not 0.0 <= max_class_drop <= 1.0:
        raise UserError(f"--max-class-drop {max_class_drop}: give a recall drop from 0 to 1 (1 turns the check off).")
    client = store.client()
    candidate = _version(client, name, version)
    network = load.model(f"models:/{name}/{candidate.version}")
    datamodule, split = labelled(network.meta, data)
    samples = datamodule.splits[split]
    fingerprint = samples.fingerprint(datamodule.describe()["root"])
    print(
        f"evaluating {name} v{candidate.version} ({network.runtime} on {network.engine}, sha256 {network.digest[:12]}) on "
        f"{datamodule.source} {split} ({len(samples)} images, fingerprint {fingerprint})"
    )
    outputs = {"candidate": logits(network, samples)}
    with lease(client, name):  # one promotion of NAME at a time: each compares with the champion it would replace
        champion = _champion(client, name)
        while True:
            if champion and str(champion.version) != str(candidate.version):
                print(f"evaluating champion v{champion.version} on the same images")
                outputs["champion"] = logits(load.model(f"models:/{name}/{champion.version}"), samples)
            moved = _champion(client, name)  # compare-and-set: the champion just before the alias moves
            if getattr(moved, "version", None) == getattr(champion, "version", None):
                break
            print(f"the champion moved to v{moved.version} meanwhile: comparing with it instead")
            champion = moved
            outputs.pop("champion", None)
        labels, classes = samples.labels, network.classes
        results = {who: scores(out, labels, len(classes)) for who, out in outputs.items()}
        sign = -1 if metric in LOWER_IS_BETTER else 1
        ours, theirs = results["candidate"][metric], results.get("champion", {}).get(metric, math.nan)
        better = math.isnan(theirs) or sign * (ours - theirs) >= min_delta
        drops = (
            class_drops(outputs["champion"], outputs["candidate"], labels, classes, max_class_drop)
            if ("champion" in outputs)
            else []
        )
        decision = "promoted" if better and not drops else ("forced" if force else "refused")
        _print_table(results, str(candidate.version), str(champion.version) if "champion" in results else None, metric)
        threshold = network.min_confidence if min_confidence is None else min_confidence
        selected = {who: selective(out, labels, threshold) for who, out in outputs.items()} if threshold else {}
        for who, (coverage, accuracy) in selected.items():
            print(f"{who:<10} at min confidence {threshold}: {coverage:.1%} answered, accuracy {accuracy:.4f}")
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "promotion.decision": decision,
            "promotion.metric": metric,
            "promotion.min_delta": str(min_delta),
            "promotion.candidate_score": f"{ours:.6g}",
            "promotion.champion_score": f"{theirs:.6g}",
            "promotion.champion_version": str(champion.version) if champion else "none",
            "promotion.max_class_drop": str(max_class_drop),
            "promotion.class_drops": json.dumps(drops),
            "promotion.data_source": datamodule.source,
            "promotion.data_fingerprint": fingerprint,
            "promotion.runtime": network.runtime,
            "promotion.engine": network.engine,
            "promotion.sha256": network.digest,
            "promotion.time": when,
            **({"promotion.min_confidence": str(threshold)} if threshold else {}),
            **{f"promotion.{who}_coverage": f"{cov:.6g}" for who, (cov, _) in selected.items()},
            **{f"promotion.{who}_selective_acc": f"{acc:.6g}" for who, (_, acc) in selected.items()},
        }
        for key, value in record.items():
            client.set_model_version_tag(name, candidate.version, key, value[:5000])
        fallen = "; ".join(
            f"class {d['class']} recall {d['reference']:.3f} -> {d['other']:.3f} ({d['images']} images)" for d in drops
        )
        line = (
            f"{when} {decision}: {metric} {ours:.4f} vs champion "
            f"{f'v{champion.version} {theirs:.4f}' if champion else 'none'} (min delta {min_delta}) "
            f"on {datamodule.source} {split}, fingerprint {fingerprint}" + (f"; {fallen}" if drops else "")
        )
        client.update_model_version(
            name, candidate.version, description=f"{candidate.description or ''}\n- {line}".lstrip("\n")
        )
        if decision == "refused":
            why = (
                f"does not beat the champion v{champion.version} by {min_delta} on {metric}"
                if not better
                else f"loses more than {max_class_drop} of a class's recall against the champion v{champion.version}"
            )
            print(
                f"refused: v{candidate.version} {why}" + (f": {fallen}" if drops else "") + ". `--force` promotes "
                "it anyway (and records that)."
            )
            return 1
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
        print(f"{decision}: {name}@{CHAMPION} is now v{candidate.version}")
        return 0


LEASE = "promotion.lease"  # the registered model's tag naming the promotion under way: "HOST:PID:TOKEN UNTIL"


@contextlib.contextmanager
def lease(client, name: str, seconds: float = 1800, settle: float = 1.0):
    """Hold NAME's promotion lease for the body, across processes and machines sharing the registry: set the tag,
    wait `settle` seconds and read it back (a writer that raced us and wrote last holds it; we wait for it). A
    lease past its deadline, or held by a process of this host that is gone, is taken over."""
    token, said = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", False
    while True:
        held = client.get_registered_model(name).tags.get(LEASE, "")
        holder, _, until = held.partition(" ")
        host, _, pid = holder.partition(":")
        alive = host != socket.gethostname() or Path(f"/proc/{pid.partition(':')[0]}").exists()
        if held and not held.startswith(token) and float(until or 0) > time.time() and alive:
            if not said:
                print(f"waiting for the promotion of {name} under way ({holder})", flush=True)
                said = True
            time.sleep(settle)
            continue
        client.set_registered_model_tag(name, LEASE, f"{token} {time.time() + seconds:.0f}")
        time.sleep(settle)
        if client.get_registered_model(name).tags.get(LEASE, "").startswith(token):
            break
    try:
        yield
    finally:
        if client.get_registered_model(name).tags.get(LEASE, "").startswith(token):
            client.delete_registered_model_tag(name, LEASE)


def _print_table(results: dict, candidate: str, champion: str | None, metric: str) -> None:
    header = f"{'metric':<12} {'candidate v' + candidate:>14}" + (
        f" {'champion v' + champion:>14} {'delta':>9}" if champion else ""
    )
    print(header)
    for key, value in results["candidate"].items():
        row = f"{key:<12} {value:>14.4f}"
        if champion:
            row += f" {results['champion'][key]:>14.4f} {value - results['champion'][key]:>+9.4f}"
        print(row + ("   <- gate" if key == metric else ""))


def latency(tags: dict) -> str:
    """A version's latency as a --target study timed it (e.g. `0.41 ms onnx-int8`), or `-`."""
    return f"{tags['tune.latency_ms']} ms {tags.get('tune.target', '')}" if "tune.latency_ms" in tags else "-"


def models_table(name: str | None = None, /) -> int:
    """List registered models, versions, aliases and key metrics.

    Args:
        name: one model only
    """
    client = store.client()
    registered = client.search_registered_models(f"name='{name}'" if name else None)
    if not registered:
        print(
            f"no registered model{' named ' + repr(name) if name else 's'} in {store.default_tracking_uri()}. "
            "Register one with `cnnlab register RUN_ID --name NAME` or `cnnlab fit ... --register NAME`."
        )
        return 1 if name else 0
    print(
        f"{'model':<24} {'version':>7} {'aliases':<20} {'test/acc':>9} {'test/f1':>8} {'latency':<20} "
        f"{'promotion':<10} {'recipe':<28} run"
    )
    for model in registered:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model.name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: -int(v.version)):
            print(
                f"{model.name:<24} {v.version:>7} {','.join(sorted(aliases.get(str(v.version), []))) or '-':<20} "
                f"{v.tags.get('test/acc', '-'):>9} {v.tags.get('test/f1', '-'):>8} {latency(v.tags):<20} "
                f"{v.tags.get('promotion.decision', '-'):<10} {v.tags.get('recipe', '-'):<28} {v.run_id}"
            )
    return 0
