"""`cnnlab data audit` on digits with labels flipped on purpose: how many of the flipped images it ranks first.

Writes a CSV manifest of scikit-learn's digits: a stratified 20% test split, and 5% of the other images given
another class (a fixed seed). Audits it with cross-validation fits of the quick-start recipe, then prints the
precision and recall, for the flipped images, of the audit's top k (k = the number flipped) and of the images it
flags, and the wall time.

    python benchmarks/label_audit.py [--fraction 0.05] [--folds 4] [--max-epochs 8] [--config recipes/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def flipped_digits(folder: Path, fraction: float = 0.05, seed: int = 0) -> tuple[Path, set[str]]:
    """A manifest of the digits with `fraction` of the non-test labels flipped: (manifest, the flipped paths)."""
    from cnnlab.sources import digits_folder

    rng = np.random.default_rng(seed)
    files = sorted(digits_folder().glob("*/*.png"))
    labels = np.array([int(f.parent.name) for f in files])
    split = np.full(len(files), "train", dtype=object)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        split[members[: round(0.2 * len(members))]] = "test"
    pool = np.flatnonzero(split == "train")
    flip = rng.choice(pool, round(fraction * len(pool)), replace=False)
    given = labels.copy()
    given[flip] = (labels[flip] + rng.integers(1, 10, len(flip))) % 10  # always another class
    manifest = folder / "digits_flipped.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows((str(file), str(label), s) for file, label, s in zip(files, given, split))
    return manifest, {str(files[i]) for i in flip}


def score(ranked: list[dict], flipped: set[str]) -> dict[str, float]:
    """Precision and recall for the flipped images of the top k (k = len(flipped)) and of the flagged ones."""
    top = {row["path"] for row in ranked[: len(flipped)]}
    flagged = {row["path"] for row in ranked if row["issue"] == "True"}
    return {
        "top_k_precision": len(top & flipped) / len(top),
        "top_k_recall": len(top & flipped) / len(flipped),
        "flagged": len(flagged),
        "flagged_precision": len(flagged & flipped) / max(1, len(flagged)),
        "flagged_recall": len(flagged & flipped) / len(flipped),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, flipped = flipped_digits(Path(tmp), args.fraction)
        started = time.time()
        subprocess.run(
            [
                *(sys.executable, "-m", "cnnlab", "data", "audit", str(manifest), "--config", args.config),
                *("--folds", str(args.folds), "--max-epochs", str(args.max_epochs), "--out", f"{tmp}/audit"),
            ],
            check=True,
            cwd=tmp,
        )
        seconds = time.time() - started
        with open(f"{tmp}/audit/label_issues.csv") as f:
            ranked = list(csv.DictReader(f))
    figures = score(ranked, flipped)
    print(
        f"{len(flipped)} of {len(ranked)} labels flipped; {args.folds} folds x {args.max_epochs} epochs of "
        f"{args.config}: top-{len(flipped)} precision {figures['top_k_precision']:.3f}, recall "
        f"{figures['top_k_recall']:.3f}; flagged {figures['flagged']}: precision {figures['flagged_precision']:.3f}, "
        f"recall {figures['flagged_recall']:.3f}; {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
