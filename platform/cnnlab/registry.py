"""The MLflow model registry: register a run's model, promote it only through an evaluation gate, list models.

Aliases, not stages: a new version becomes `challenger`; `champion` moves only when the candidate beats the
current champion on the same held-out data (or with --force, which is recorded). Every decision is written
onto the candidate version as tags and a line of its description.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnlab import UserError
from cnnlab.tracking import default_tracking_uri

CHALLENGER, CHAMPION = "challenger", "champion"
LOWER_IS_BETTER = {"test/loss"}


def _client():
    """A client on the project's store, which is also where `models:/` URIs resolve."""
    import mlflow

    uri = default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri)


def register(run_id: str, name: str):
    """A new version of NAME from the run's logged model, tagged with recipe, data and test metrics."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run '{run_id}' is not in {default_tracking_uri()}. The MLflow UI (`cnnlab ui`) lists "
                        "the runs; set MLFLOW_TRACKING_URI if the run lives elsewhere.") from None
    model_uri = run.data.tags.get("cnnlab.model_uri")
    if not model_uri:
        raise UserError(f"run '{run_id}' has no logged model (its fit did not finish, or ran with --log_model "
                        "false). Fit the recipe again.")
    tags = {"recipe": run.info.run_name or "", "recipe_uri": f"runs:/{run_id}/recipe.yaml", "run_id": run_id,
            "data.source": run.data.tags.get("cnnlab.data.source", ""),
            "data.fingerprint": run.data.tags.get("cnnlab.data.fingerprint", ""),
            **{k: f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test/") and k.count("/") == 1}}
    version = mlflow.register_model(model_uri, name, tags=tags)
    recipe = client.download_artifacts(run_id, "recipe.yaml")
    client.update_model_version(name, version.version, description=(
        f"Trained by run {run_id} ({run.info.run_name}). Recipe:\n\n```yaml\n{Path(recipe).read_text()}```\n"))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def checkpoint_of(uri: str) -> Path:
    """The Lightning checkpoint behind a model: a .ckpt path, a run id or runs:/RUN_ID[/...], or a registered
    models:/NAME@ALIAS or models:/NAME/VERSION (the best checkpoint its run logged)."""
    from mlflow.exceptions import MlflowException

    if Path(uri).is_file():
        return Path(uri)
    client = _client()
    try:
        if uri.startswith("models:/"):
            name, _, ref = uri[len("models:/"):].partition("@")
            if ref:
                run_id = client.get_model_version_by_alias(name, ref).run_id
            else:
                name, _, version = name.partition("/")
                run_id = client.get_model_version(name, version).run_id
        else:
            run_id = uri[len("runs:/"):].split("/")[0] if uri.startswith("runs:/") else uri
        return Path(client.download_artifacts(run_id, "checkpoints/best.ckpt"))
    except (MlflowException, OSError) as err:
        raise UserError(f"'{uri}' is not a checkpoint file, a run with a logged checkpoint, or a registered model "
                        f"version ({str(err).splitlines()[0][:200]}). `cnnlab models` lists registered models.") from None


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
        raise UserError(f"no version {version or '(latest)'} of a registered model '{name}'. Registered models: "
                        f"{known}. `cnnlab models` lists them.") from None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def evaluation_data(client, version, source: str | None):
    """The held-out split to judge on: the registered recipe's test data, or SOURCE read the same way."""
    import yaml
    from jsonargparse import ArgumentParser

    from cnnlab.data import DataModule

    recipe = yaml.safe_load(Path(client.download_artifacts(version.run_id, "recipe.yaml")).read_text())
    data = {**(recipe.get("data") or {}), **({"source": source} if source else {}), "num_workers": 0}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data
    split = "test" if "test" in datamodule.splits else "val"
    if split not in datamodule.splits:
        raise UserError(f"--data {datamodule.source}: no test or val split to evaluate on.")
    return datamodule, split


def evaluate(model_uri: str, datamodule, split: str, batch: int = 256) -> dict[str, float]:
    """Top-1, top-5, macro-F1 and loss of a registered model, through its own pyfunc on raw image bytes."""
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    model = mlflow.pyfunc.load_model(model_uri)
    samples = datamodule.splits[split]
    probs = np.concatenate([
        np.stack(model.predict(pd.DataFrame({"image": [samples.raw(i, datamodule.image_size)
                                                       for i in range(start, min(start + batch, len(samples)))]}))
                 ["probabilities"].to_numpy())
        for start in range(0, len(samples), batch)])
    labels = np.asarray(samples.labels)
    if probs.shape[1] != datamodule.num_classes:
        raise UserError(f"the model knows {probs.shape[1]} classes but the data has {datamodule.num_classes}: "
                        "evaluate on data with the model's classes.")
    top5 = np.argsort(-probs, axis=1)[:, :5]
    return {"test/acc": float((probs.argmax(1) == labels).mean()),
            "test/top5": float((top5 == labels[:, None]).any(1).mean()),
            "test/f1": float(multiclass_f1_score(torch.from_numpy(probs), torch.from_numpy(labels),
                                                 num_classes=probs.shape[1], average="macro")),
            "test/loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())}


def promote(name: str, version: str | None = None, metric: str = "test/acc", min_delta: float = 0.0,
            data: str | None = None, force: bool = False) -> int:
    """Move `champion` to the candidate only if it beats the champion by min_delta; 0 when promoted."""
    client = _client()
    candidate = _version(client, name, version)
    champion = _champion(client, name)
    datamodule, split = evaluation_data(client, candidate, data)
    fingerprint = datamodule.splits[split].fingerprint(datamodule.describe()["root"])
    print(f"evaluating {name} v{candidate.version}" + (f" and champion v{champion.version}" if champion and
          str(champion.version) != str(candidate.version) else "") + f" on {datamodule.source} {split} "
          f"({len(datamodule.splits[split])} images, fingerprint {fingerprint})")
    scores = {"candidate": evaluate(f"models:/{name}/{candidate.version}", datamodule, split)}
    if metric not in scores["candidate"]:
        raise UserError(f"--metric {metric} is not computed. Choices: {', '.join(scores['candidate'])}.")
    if champion and str(champion.version) != str(candidate.version):
        scores["champion"] = evaluate(f"models:/{name}/{champion.version}", datamodule, split)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    ours, theirs = scores["candidate"][metric], scores.get("champion", {}).get(metric, math.nan)
    better = math.isnan(theirs) or sign * (ours - theirs) >= min_delta
    decision = "promoted" if better else ("forced" if force else "refused")
    _print_table(scores, str(candidate.version), str(champion.version) if "champion" in scores else None, metric)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"promotion.decision": decision, "promotion.metric": metric, "promotion.min_delta": str(min_delta),
              "promotion.candidate_score": f"{ours:.6g}", "promotion.champion_score": f"{theirs:.6g}",
              "promotion.champion_version": str(champion.version) if champion else "none",
              "promotion.data_source": datamodule.source, "promotion.data_fingerprint": fingerprint,
              "promotion.time": when}
    for key, value in record.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    line = (f"{when} {decision}: {metric} {ours:.4f} vs champion "
            f"{f'v{champion.version} {theirs:.4f}' if champion else 'none'} (min delta {min_delta}) "
            f"on {datamodule.source} {split}, fingerprint {fingerprint}")
    client.update_model_version(name, candidate.version,
                                description=f"{candidate.description or ''}\n- {line}".lstrip("\n"))
    if decision == "refused":
        print(f"refused: v{candidate.version} does not beat the champion by {min_delta} on {metric}. "
              f"`--force` promotes it anyway (and records that).")
        return 1
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    print(f"{decision}: {name}@{CHAMPION} is now v{candidate.version}")
    return 0


def _print_table(scores: dict, candidate: str, champion: str | None, metric: str) -> None:
    header = f"{'metric':<12} {'candidate v' + candidate:>14}" + (f" {'champion v' + champion:>14} {'delta':>9}"
                                                                   if champion else "")
    print(header)
    for key, value in scores["candidate"].items():
        row = f"{key:<12} {value:>14.4f}"
        if champion:
            row += f" {scores['champion'][key]:>14.4f} {value - scores['champion'][key]:>+9.4f}"
        print(row + ("   <- gate" if key == metric else ""))


def models_table(name: str | None = None) -> int:
    """`cnnlab models [NAME]`: registered models, versions, aliases and key metrics."""
    client = _client()
    registered = client.search_registered_models(f"name='{name}'" if name else None)
    if not registered:
        print(f"no registered model{' named ' + repr(name) if name else 's'} in {default_tracking_uri()}. "
              "Register one with `cnnlab register RUN_ID --name NAME` or `cnnlab fit ... --register NAME`.")
        return 1 if name else 0
    print(f"{'model':<24} {'version':>7} {'aliases':<20} {'test/acc':>9} {'test/f1':>8} {'promotion':<10} "
          f"{'recipe':<28} run")
    for model in registered:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model.name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: -int(v.version)):
            print(f"{model.name:<24} {v.version:>7} {','.join(sorted(aliases.get(str(v.version), []))) or '-':<20} "
                  f"{v.tags.get('test/acc', '-'):>9} {v.tags.get('test/f1', '-'):>8} "
                  f"{v.tags.get('promotion.decision', '-'):<10} {v.tags.get('recipe', '-'):<28} {v.run_id}")
    return 0
