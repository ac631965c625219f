"""`cnnlab data audit SOURCE`: the images whose given label is probably wrong, found by confident learning
(cleanlab) on out-of-sample predicted probabilities. By default K cross-validation fits of a recipe, each a child
run nested under the audit's MLflow run, each scoring the fold it never trained on (data.fold); with `--model`,
that model's probabilities on the splits it never trained on. Writes a CSV ranked by label quality and a grid of
the top suspects, and logs both to the audit's run."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import yaml

from cnnlab import UserError

COLUMNS = ("rank", "path", "split", "given", "suggested", "quality", "p_given", "p_suggested", "issue")


def audit(
    source: str,
    /,
    recipe: str | None = None,
    model: str | None = None,
    folds: int = 4,
    max_epochs: int | None = None,
    top: int = 32,
    out: str = "audit",
) -> int:
    """Find images whose label is probably wrong (cleanlab's confident learning on out-of-sample probabilities).

    Args:
        source: the data to audit (an ImageFolder, CSV manifest, shard folder or `digits`)
        recipe: the recipe whose fits give the probabilities: its train and val images are pooled into --folds
            folds, and each fold is scored by a fit on the others (its test split is left alone)
        model: instead of fitting, this model's probabilities on the val and test splits of SOURCE (as split
            when it was trained): the images it never trained on
        folds: cross-validation fits (with --config)
        max_epochs: each fit's epochs (default: the recipe's)
        top: suspects in the thumbnail grid
        out: the folder for label_issues.csv and suspects.png (created)
    """
    from cnnlab import store

    if bool(recipe) == bool(model):
        raise UserError(
            "data audit needs --config RECIPE (cross-validation fits) or --model MODEL_URI (a trained model's "
            "probabilities on the splits it never saw), one of them."
        )
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs 2 folds or more.")
    started = time.time()
    # what can be wrong with the input is found before the audit's run is opened
    rows, how, classes = model_probabilities(model, source) if model else (None, None, None)
    fits = None if model else fold_recipe(recipe, source, max_epochs)
    tags = {"cnnlab.role": "audit", "cnnlab.audit.source": source}
    with store.run(f"audit-{Path(source).name or source}", tags) as parent:
        if fits:
            rows, how, classes = fold_probabilities(*fits, folds, parent)
        log(parent, {"source": source, "method": how[:500], **({"model": model} if model else {})})
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        ranked, flagged = rank(rows, classes)
        write_csv(ranked, folder / "label_issues.csv")
        grid(ranked[: min(top, max(flagged, 1))], folder / "suspects.png", how)
        parent.client.log_artifact(parent.id, str(folder / "label_issues.csv"), "audit")
        parent.client.log_artifact(parent.id, str(folder / "suspects.png"), "audit")
        seconds = time.time() - started
        log(parent, metrics={"audit/images": len(ranked), "audit/issues": flagged, "audit/seconds": seconds})
    print(f"audited {len(ranked)} images ({how}) in {seconds:.0f} s: {flagged} probably mislabelled")
    print(f"{'rank':>4}  {'given':<12} {'suggested':<12} {'quality':>7}  path")
    for row in ranked[: min(10, flagged)]:
        print(f"{row['rank']:>4}  {row['given']:<12} {row['suggested']:<12} {row['quality']:>7.3f}  {row['path']}")
    print(f"wrote {folder}/label_issues.csv (every image, ranked) and {folder}/suspects.png; MLflow run {parent.id}")
    return 0


def fold_recipe(recipe: str, source: str, max_epochs: int | None) -> tuple:
    """(the recipe's path, the recipe on `source` with the epochs, its DataModule)."""
    from cnnlab.data import DataModule
    from cnnlab.sources import resolve_path
    from cnnlab.supervisor import apply

    path = resolve_path(recipe)
    if not path.is_file():
        raise UserError(f"--config {recipe}: no such recipe file.")
    base = apply(yaml.safe_load(path.read_text()) or {}, {"data.source": source})
    if max_epochs:
        base = apply(base, {"trainer.max_epochs": max_epochs})
    try:
        datamodule = DataModule(**base.get("data", {}))
    except TypeError as err:
        raise UserError(f"--config {recipe}: its data section does not fit ({err}).") from None
    return path, base, datamodule


def fold_probabilities(path: Path, base: dict, datamodule, folds: int, parent) -> tuple[list, str, list[str]]:
    """Each fold's images scored by the model of a fit on the other folds (a child run of `parent`); what was
    audited, in words; the classes."""
    from cnnlab import load, store
    from cnnlab.sources import fold_splits
    from cnnlab.supervisor import apply, fit, why_failed

    seed = datamodule.hparams.split_seed
    epochs = (base.get("trainer") or {}).get("max_epochs", "the recipe's")
    log(parent, {"recipe": str(path), "folds": folds, "max_epochs": epochs})
    parent.client.log_text(parent.id, yaml.safe_dump(base, sort_keys=False), "audit/recipe.yaml")
    rows = []
    for k in range(1, folds + 1):
        tags = {"mlflow.parentRunId": parent.id, "cnnlab.audit.fold": f"{k}/{folds}"}
        with store.run(f"fold-{k}-of-{folds}", tags) as run:
            print(f"fold {k}/{folds}: fitting on the other folds ({epochs} epochs) ...", flush=True)
            proc = fit(
                apply(base, {"data.fold": f"{k}/{folds}"}),
                run.id,
                "cnnlab",
                store.default_tracking_uri(),
                name=f"fold-{k}",
                extra=["--test_after_fit=false"],
            )
            if proc.returncode != 0:
                run.status = "FAILED"
                raise UserError(f"fold {k}/{folds}: the fit failed: {why_failed(proc)}")
            held = fold_splits(datamodule.splits, k, folds, seed)["val"]
            rows += scored(load.model(run.id), held, f"fold {k}")
    return rows, f"{folds}-fold cross-validation of {path.name} on the train and val splits", datamodule.classes


def model_probabilities(model: str, source: str) -> tuple[list, str, list[str]]:
    """The model's probabilities on the val and test splits of the source, as split when it was trained; what
    was audited, in words; the model's classes."""
    from cnnlab import load
    from cnnlab.data import labelled

    network = load.model(model)
    datamodule, _ = labelled(network.meta, source)
    splits = [s for s in ("val", "test") if len(datamodule.splits.get(s) or ())]
    rows = [row for split in splits for row in scored(network, datamodule.splits[split], split)]
    unseen = " and ".join(f"{split} ({len(datamodule.splits[split])})" for split in splits)
    trained = len(datamodule.splits["train"])
    how = f"{model} on the {unseen} images it never trained on; its {trained} training images need the fold fits"
    return rows, how, network.classes


def scored(network, samples, split: str) -> list[dict]:
    """One row per image: where it is, its given label, and the network's probabilities."""
    from cnnlab.cnnlab_model import softmax
    from cnnlab.evaluate import logits

    probs = softmax(logits(network, samples))
    return [
        {
            "path": samples.name(i),
            "split": split,
            "label": label,
            "probs": p,
            "image": (samples, i),
        }
        for i, (label, p) in enumerate(zip(samples.labels, probs))
    ]


def rank(rows: list[dict], classes: list[str]) -> tuple[list[dict], int]:
    """The rows ranked by label quality (cleanlab's self-confidence: the probability of the given label), worst
    first, each marked an issue or not by confident learning (prune by noise rate); the number of issues."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if not rows:
        raise UserError("no image to audit: the source has no images in the audited splits.")
    labels = np.array([row["label"] for row in rows])
    probs = np.stack([row["probs"] for row in rows]).astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    issues = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs)
    ranked = []
    for place, i in enumerate(np.argsort(quality, kind="stable"), start=1):
        suggested = int(probs[i].argmax())
        ranked.append(
            {
                "rank": place,
                "path": rows[i]["path"],
                "split": rows[i]["split"],
                "given": classes[labels[i]],
                "suggested": classes[suggested],
                "quality": round(float(quality[i]), 4),
                "p_given": round(float(probs[i, labels[i]]), 4),
                "p_suggested": round(float(probs[i, suggested]), 4),
                "issue": bool(issues[i]),
                "image": rows[i].get("image"),
            }
        )
    return ranked, int(issues.sum())


def log(run, params: dict | None = None, metrics: dict | None = None) -> None:
    for key, value in (params or {}).items():
        run.client.log_param(run.id, key, value)
    for key, value in (metrics or {}).items():
        run.client.log_metric(run.id, key, value)


def write_csv(ranked: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)


def grid(ranked: list[dict], path: Path, how: str) -> None:
    """The top suspects as captioned thumbnails (given -> suggested, quality)."""
    from cnnlab.cam import sheet
    from cnnlab.sources import BadImageError, open_image

    tiles = []
    for row in ranked:
        samples, i = row["image"]
        try:
            image, _ = open_image(samples.raw(i), 1 << 26)
        except (BadImageError, OSError):
            continue
        tiles.append(
            (
                image,
                f"#{row['rank']} {Path(row['path']).name[:16]}\n{row['given']} -> {row['suggested']} {row['quality']:.2f}",
            )
        )
    if not tiles:
        tiles = [(np.full((8, 8, 3), 255, np.uint8), "no suspects")]
    sheet(tiles, path, f"label audit: top suspects ({how})"[:110])
