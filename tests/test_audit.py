"""The label audit: `cnnlab data audit` finds images whose label was flipped, from cross-validation fits or a model."""

import csv
import sys

import numpy as np
import pytest
import yaml

from cnnlab import UserError
from cnnlab.sources import Samples, fold_splits
from conftest import QUICKSTART, ROOT, cnnlab_here, mlflow_client

sys.path.insert(0, str(ROOT / "benchmarks"))
from label_audit import flipped_digits, score  # noqa: E402


def test_folds_hold_out_every_pooled_image_once_per_class_and_leave_test_alone():
    labels = [i % 3 for i in range(60)]
    splits = {
        "train": Samples([f"t{i}" for i in range(48)], labels[:48]),
        "val": Samples([f"v{i}" for i in range(12)], labels[48:]),
        "test": Samples(["x"], [0]),
    }
    held = [fold_splits(splits, k, 4, seed=0) for k in (1, 2, 3, 4)]
    vals = [set(fold["val"].items) for fold in held]
    assert sorted(x for v in vals for x in v) == sorted(splits["train"].items + splits["val"].items)
    for fold, val in zip(held, vals):
        assert not val & set(fold["train"].items) and len(val) + len(fold["train"]) == 60
        assert np.bincount(fold["val"].labels).tolist() == [5, 5, 5]  # each class dealt evenly
        assert fold["test"] is splits["test"]
    assert fold_splits(splits, 2, 4, seed=0)["val"].items == held[1]["val"].items  # fixed by the seed


def test_a_fold_is_k_of_k():
    from cnnlab.data import parse_fold

    assert parse_fold("2/5") == (2, 5)
    for wrong in ("0/5", "6/5", "1/1", "two/5", "3"):
        with pytest.raises(UserError, match="data.fold"):
            parse_fold(wrong)


def test_the_ranking_puts_a_confidently_contradicted_label_first():
    from cnnlab.audit import rank

    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        label = i % 4
        probs = rng.uniform(0.05, 0.1, 4)
        probs[label] = 0.8
        rows.append({"path": f"{i}.png", "split": "val", "label": label, "probs": probs})
    rows[7]["label"], rows[7]["probs"] = 2, np.array([0.01, 0.01, 0.01, 0.97])  # sure of d, labelled c
    ranked, flagged = rank(rows, list("abcd"))
    assert ranked[0]["path"] == "7.png" and ranked[0]["given"] == "c" and ranked[0]["suggested"] == "d"
    assert ranked[0]["issue"] and flagged == 1 and [r["rank"] for r in ranked] == list(range(1, 201))


def test_the_audit_needs_a_recipe_or_a_model(tmp_path):
    for flags in ([], ["--config", str(QUICKSTART), "--model", "models:/x/1"]):
        result = cnnlab_here("data", "audit", "digits", *flags, cwd=tmp_path)
        assert result.returncode == 2 and "--config RECIPE" in result.stderr
    result = cnnlab_here("data", "audit", "digits", "--config", str(QUICKSTART), "--folds", "1", cwd=tmp_path)
    assert result.returncode == 2 and "--folds 1" in result.stderr


@pytest.mark.slow
def test_the_audit_finds_most_flipped_labels_on_digits(tmp_path):
    """5% of digits' labels flipped (72 of 1,438 train and val images); two folds of 4 epochs at 8 px. Chance ranks
    5% of the flipped images in the top 72; the floor is ten times that."""
    manifest, flipped = flipped_digits(tmp_path)
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"]["image_size"] = 8
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "audit"
    flags = ["--config", "small.yaml", "--folds", "2", "--max-epochs", "4", "--out", str(out)]
    result = cnnlab_here("data", "audit", str(manifest), *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "label_issues.csv") as f:
        ranked = list(csv.DictReader(f))
    assert len(ranked) == 1438 and (out / "suspects.png").stat().st_size > 1000
    figures = score(ranked, flipped)
    print(figures)
    assert figures["top_k_precision"] >= 0.5 and figures["top_k_recall"] >= 0.5
    qualities = [float(r["quality"]) for r in ranked]
    assert qualities == sorted(qualities)
    assert all(r["given"] != r["suggested"] for r in ranked[:10] if r["issue"] == "True")

    client = mlflow_client(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cnnlab.role") == "audit"]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in folds) == ["fold-1-of-2", "fold-2-of-2"]
    assert all(r.info.status == "FINISHED" for r in (parent, *folds))
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "audit")}
    assert {"audit/label_issues.csv", "audit/suspects.png"} <= logged
    assert parent.data.metrics["audit/images"] == 1438 and parent.data.params["folds"] == "2"

    # A model's own view: the fold it was validated on and the test split, which it never trained on.
    fold = next(r for r in folds if r.info.run_name == "fold-1-of-2")
    again = tmp_path / "again"
    result = cnnlab_here("data", "audit", str(manifest), "--model", fold.info.run_id, "--out", str(again), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val (719) and test (359) images it never trained on" in result.stdout
    with open(again / "label_issues.csv") as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"val", "test"}
