"""The same Optuna study budget with and without pruning: epochs trained and the best value found.

Both studies draw from the same space with the same sampler seed; the pruned one uses the median
pruner. Prints the epochs each used, their ratio (target >= 2x fewer with pruning) and the best values
(target: within 0.5 points).

    python benchmarks/tune_pruning.py [--config recipes/quickstart.yaml] [--space recipes/spaces/quickstart.yaml]
                                      [--n-trials 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import optuna

from cnnlab.tune import open_storage, tune


def run(config, space, n_trials, workers, pruner, folder) -> dict:
    storage = f"sqlite:///{folder}/optuna.db"
    tune(config, space, n_trials=n_trials, study=f"bench-{pruner}", storage=storage, workers=workers,
         pruner=pruner, seed=0, out_dir=folder)
    study = optuna.load_study(study_name=f"bench-{pruner}", storage=open_storage(storage))
    return {"epochs": sum(t.user_attrs.get("epochs", 0) for t in study.trials), "best": study.best_value,
            "pruned": sum(t.state.name == "PRUNED" for t in study.trials), "trials": len(study.trials)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--space", default="recipes/spaces/quickstart.yaml")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        results = {p: run(args.config, args.space, args.n_trials, args.workers, p, tmp) for p in ("none", "median")}
    none, median = results["none"], results["median"]
    print(f"\n{args.n_trials} trials of {args.config} over {args.space}, {args.workers} workers")
    print(f"{'pruner':<8} {'epochs':>7} {'pruned':>7} {'best':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['epochs']:>7} {r['pruned']:>7} {r['best']:>8.4f}")
    print(f"epochs saved: {none['epochs'] / max(1, median['epochs']):.2f}x fewer with pruning (target >= 2x); "
          f"best value difference {100 * (median['best'] - none['best']):+.2f} points (target within 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
