"""`cnnlab compare`: recipes trained under one budget as nested MLflow runs, then compared side by side.

Inputs are recipes, or study files (recipes/studies/*.yaml) that list recipes with a budget, overrides
for all of them, extra callbacks and a grid of values to cross them with:

    name: activations
    max_epochs: 10
    recipes: [recipes/studies/vgg19_plain_32_cifar10.yaml, recipes/cifar10/resnet18_32_onecycle30.yaml]
    grid: {model.act: [relu, gelu]}
    overrides: {trainer.limit_train_batches: 100}
    callbacks: [{class_path: cnnlab.callbacks.GradientFlow, init_args: {every_n_steps: 20}}]

The table (family, params, GFLOPs, training img/s here, best val and test top-1, wall time) is printed
and logged with three plots (top-1 against params, against throughput, val curves) to the parent run.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from pathlib import Path

import yaml

from cnnlab import UserError

MARKERS = ("<!-- measured:start -->", "<!-- measured:end -->")


def expand(
    paths: list[str], max_epochs: int | None, overrides: dict | None = None
) -> tuple[str | None, list[tuple[str, dict]], int | None]:
    """(study name, [(run name, recipe)], budget) from recipe and study files; `overrides` apply to all."""
    from cnnlab.sources import resolve_path
    from cnnlab.supervisor import apply

    name, entries, budget = None, [], max_epochs
    for given in paths:
        path = resolve_path(given)
        if not path.exists():
            raise UserError(f"{given}: no such recipe or study file.")
        data = yaml.safe_load(path.read_text()) or {}
        if "recipes" not in data:
            entries.append((path.stem, data))
            continue
        name = name or data.get("name") or path.stem
        budget = max_epochs or data.get("max_epochs")
        grid = data.get("grid") or {}
        for recipe_path in data["recipes"]:
            recipe_file = resolve_path(recipe_path)
            if not recipe_file.exists():
                raise UserError(f"{given}: recipe {recipe_path} does not exist.")
            base = apply(yaml.safe_load(recipe_file.read_text()) or {}, data.get("overrides") or {})
            if data.get("callbacks"):
                trainer = base.setdefault("trainer", {})
                trainer["callbacks"] = [*(trainer.get("callbacks") or []), *data["callbacks"]]
            for values in itertools.product(*grid.values()):
                combo = dict(zip(grid, values))
                label = "-".join(  # a dict value by its own keys: model_args {lrn: false} as lrn=False
                    ",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else f"{k.split('.')[-1]}={v}"
                    for k, v in combo.items()
                )
                entries.append((f"{recipe_file.stem}{'-' + label if label else ''}", apply(base, combo)))
    common = {**({"trainer.max_epochs": budget} if budget else {}), **(overrides or {})}
    entries = [(n, apply(r, common)) for n, r in entries]
    if len({n for n, _ in entries}) != len(entries):
        raise UserError("two entries of the comparison share a name: give each recipe once.")
    return name, entries, budget


def row(client, run_id: str) -> dict:
    """One line of the table, from a finished run: the model measured again, the metrics as logged."""
    from cnnlab.models import CLASSIC, measure

    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    model = params.get("model.model", "?")
    image_size = int(params.get("data.image_size", 224))
    classes = len(json.loads(run.data.tags.get("cnnlab.data.class_counts") or "{}")) or 10
    try:
        size = measure(model, image_size, num_classes=classes, small_input=params.get("model.small_input") == "True")
    except (UserError, RuntimeError):  # e.g. a run that failed because its input was too small
        size = {"params": float("nan"), "gmacs": float("nan")}
    history = sorted(client.get_metric_history(run_id, "val/acc"), key=lambda m: m.step)
    speeds = [m.value for m in client.get_metric_history(run_id, "train/device/samples_per_sec")]
    end = run.info.end_time or run.info.start_time
    return {
        "name": run.info.run_name,
        "run_id": run_id,
        "model": model,
        "family": CLASSIC.get(model, (model,))[0],
        "act": params.get("model.act", "None"),
        "params": size["params"],
        "gflops": size["gmacs"],
        "image_size": image_size,
        "img_per_sec": max(speeds) if speeds else float("nan"),
        "best_val": max((m.value for m in history), default=float("nan")),
        "test": metrics.get("test/acc", float("nan")),
        "minutes": (end - run.info.start_time) / 60000,
        "val_curve": [m.value for m in history],
        "status": run.info.status,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| run | family | params | GFLOPs* | input | train img/s | best val top-1 | test top-1 | wall min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']}{' (failed)' if r['status'] == 'FAILED' else ''} | {r['family']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.3f} | {r['image_size']} "
            f"| {r['img_per_sec']:.0f} | {r['best_val']:.4f} | {r['test']:.4f} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n\n\\* multiply-adds of one forward pass at the trained input size.\n"


def plots(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for key, label, log in (
        ("params", "parameters", True),
        ("img_per_sec", "training images / s (this machine)", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in rows:
            ax.scatter(r[key], r["test"] if r["test"] == r["test"] else r["best_val"])
            ax.annotate(r["name"], (r[key], r["test"] if r["test"] == r["test"] else r["best_val"]), fontsize=7)
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(folder / f"top1_vs_{key}.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], marker=".", label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(folder / "val_curves.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    return out


def write_docs(path: str, table: str, source: str) -> None:
    """Replace the measured block of a markdown file (between its markers) with the new table."""
    doc = Path(path)
    text = doc.read_text() if doc.exists() else ""
    block = f"{MARKERS[0]}\n_Generated by `cnnlab compare` from {source}; do not edit by hand._\n\n{table}{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        text = re.sub(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def train(run_name: str, recipe: dict, parent: str, comparison: str) -> str:
    """One recipe of a comparison fitted in its own process, into a run nested under `parent`; its run id."""
    from cnnlab import store
    from cnnlab.supervisor import fit, why_failed

    tags = {"mlflow.parentRunId": parent, "cnnlab.compare": comparison}
    with store.run(run_name, tags) as run:
        print(f"training {run_name} ...", flush=True)
        proc = fit(recipe, run.id, "cnnlab", store.default_tracking_uri(), name=run_name, extra=["--log_model=false"])
        if proc.returncode != 0:
            print(f"  failed: {why_failed(proc)}")
            run.status = "FAILED"
    return run.id


def report(parent, run_ids: list[str]) -> str:
    """The table of the runs, printed and logged with its plots to the parent run; the table."""
    rows = [row(parent.client, run_id) for run_id in run_ids]
    table = format_table(rows)
    print(table)
    parent.client.log_text(parent.id, table, "comparison.md")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plots(rows, Path(tmp)):
            parent.client.log_artifact(parent.id, str(path), "plots")
    return table


def parse_override(item: str) -> tuple[str, object]:
    """`dotted.key=value` (the value read as YAML) as a pair."""
    key, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"--set {item}: write it as dotted.key=value, e.g. trainer.limit_train_batches=20")
    return key, yaml.safe_load(value)


def compare(
    paths: list[str] = (),
    /,
    max_epochs: int | None = None,
    name: str | None = None,
    runs: list[str] | None = None,
    docs: str | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Train recipes under one budget and compare them (nested MLflow runs), or compare finished runs.

    Args:
        paths: recipes and/or study files (recipes/studies/)
        max_epochs: the same epoch budget for every recipe
        name: the comparison's name (the study's)
        runs: compare finished runs instead of training (a former comparison's parent run stands for its children)
        docs: write the measured table into this markdown file's measured block (e.g. docs/architectures.md)
        overrides: KEY=VALUE, a dotted recipe key for every run, e.g. trainer.limit_train_batches=20
    """
    from cnnlab import store

    overrides = dict(parse_override(item) for item in overrides or ())

    if runs:
        client = store.client()
        experiment_id = store.experiment_id(client)
        from mlflow.exceptions import MlflowException

        run_ids = []
        for given in runs:  # a former comparison's parent stands for its children
            try:
                client.get_run(given)
            except MlflowException:
                raise UserError(f"--runs {given}: no such run in {store.default_tracking_uri()}.") from None
            children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{given}'")
            run_ids += [c.info.run_id for c in sorted(children, key=lambda c: c.info.start_time)] or [given]
        tags = {"cnnlab.role": "compare", "cnnlab.compared_runs": ",".join(run_ids)[:5000]}
        with store.run(f"compare-{name or 'runs'}", tags) as parent:
            table = report(parent, run_ids)
        print(f"MLflow: run {parent.id} holds the table and plots")
        source = f"runs {', '.join(runs)}"
    else:
        if not paths:
            raise UserError("cnnlab compare needs recipes, a study file (recipes/studies/) or --runs RUN_ID ...")
        study, entries, budget = expand(paths, max_epochs, overrides)
        name = name or study or "compare"
        with store.run(f"compare-{name}", {"cnnlab.role": "compare", "cnnlab.compare": name}) as parent:
            parent.client.log_param(parent.id, "max_epochs", str(budget))
            for key, value in (overrides or {}).items():
                parent.client.log_param(parent.id, f"set.{key}", str(value))
            run_ids = [train(run_name, recipe, parent.id, name) for run_name, recipe in entries]
            table = report(parent, run_ids)
        print(f"MLflow: run {parent.id} holds the table and plots, with {len(run_ids)} nested runs")
        settings = ", ".join([f"max_epochs={budget}"] + [f"{k}={v}" for k, v in (overrides or {}).items()])
        source = f"the comparison '{name}' (MLflow run {parent.id}; budget: {settings})"
    if docs:
        write_docs(docs, table, source)
        print(f"wrote the measured table into {docs}")
    return 0
