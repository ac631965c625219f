"""The same Optuna study budget with and without pruning: epochs trained and the best value found.

Both studies train the same configurations, drawn once at random from the space and queued in each; the
pruned one uses the median pruner. So the epochs compare like for like, and the best values differ only
where pruning stopped the eventual winner. Prints the epochs each used, their ratio (target >= 2x fewer
with pruning) and the best values (target: within 0.5 points).

    python benchmarks/tune_pruning.py [--config recipes/quickstart.yaml] [--space recipes/spaces/quickstart.yaml]
                                      [--n-trials 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import optuna

from cnnlab.tune import load_space, open_storage, suggest, tune


def configurations(space_path: str, n: int, seed: int = 0) -> list[dict]:
    space, _ = load_space(space_path)
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = draw.ask()
        for key, dist in space.items():
            suggest(trial, key, dist)
        points.append(trial.params)
    return points


def run(config, space, points, workers, pruner, folder) -> dict:
    storage = f"sqlite:///{folder}/optuna.db"
    queued = optuna.create_study(study_name=f"bench-{pruner}", storage=open_storage(storage), direction="maximize")
    for point in points:
        queued.enqueue_trial(point)
    tune(
        config,
        space,
        n_trials=len(points),
        study=f"bench-{pruner}",
        storage=storage,
        workers=workers,
        pruner=pruner,
        seed=0,
        out_dir=folder,
    )
    study = optuna.load_study(study_name=f"bench-{pruner}", storage=open_storage(storage))
    return {
        "epochs": sum(t.user_attrs.get("epochs", 0) for t in study.trials),
        "best": study.best_value,
        "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
        "trials": len(study.trials),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--space", default="recipes/spaces/quickstart.yaml")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        points = configurations(args.space, args.n_trials)
        results = {p: run(args.config, args.space, points, args.workers, p, tmp) for p in ("none", "median")}
    none, median = results["none"], results["median"]
    print(
        f"\nthe same {args.n_trials} random configurations of {args.config} over {args.space}, {args.workers} workers"
    )
    print(f"{'pruner':<8} {'epochs':>7} {'pruned':>7} {'best':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['epochs']:>7} {r['pruned']:>7} {r['best']:>8.4f}")
    print(
        f"epochs saved: {none['epochs'] / max(1, median['epochs']):.2f}x fewer with pruning (target >= 2x); "
        f"best value difference {100 * (median['best'] - none['best']):+.2f} points (target within 0.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
