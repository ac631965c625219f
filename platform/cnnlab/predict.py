"""`cnnlab predict MODEL_URI PATH ...`: classify new, unlabelled images with a model, from the model alone.

PATH is an image file, a folder (its images, recursively), a glob (`photos/**/*.jpg`) or a CSV whose `path`
column (else its first column) lists images, relative to the CSV. Writes one row per image: its path, the
answer (empty and `unsure` below the model's confidence threshold) and the top-k labels with their
probabilities, as CSV or JSON. A file that cannot be read or decoded is
listed and skipped, never fatal.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cnnlab import UserError
from cnnlab.cnnlab_model import RUNTIMES, read_image, softmax
from cnnlab.sources import IMAGE_EXTENSIONS


def find_images(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths in order, (path, why) for what matched nothing)."""
    found, missing = [], []
    for arg in paths:
        path = Path(arg)
        if any(c in arg for c in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            found += [m for m in matches if Path(m).is_file()]
            if not matches:
                missing.append((arg, "no file matches this pattern"))
        elif path.is_dir():
            found += [
                str(p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            ]
        elif path.suffix.lower() == ".csv" and path.is_file():
            found += read_csv(path)
        elif path.exists():
            found.append(arg)
        else:
            missing.append((arg, "no such file or folder"))
    return list(dict.fromkeys(found)), missing


def read_csv(path: Path) -> list[str]:
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        return []
    column = rows[0].index("path") if "path" in rows[0] else 0
    body = rows[1:] if rows[0][column] in ("path", "file", "image", "filename") else rows
    return [str(path.parent / row[column]) if not Path(row[column]).is_absolute() else row[column] for row in body]


def read_batches(network, files: list[str], batch_size: int):
    """Yield (paths, uint8 N x H x W x 3 inputs, [(path, error)]) per batch of files, each image read and cropped
    as the network takes it; a file that does not decode is listed with its error, never fatal."""
    for start in range(0, len(files), batch_size):
        good, images, failed = [], [], []
        for file in files[start : start + batch_size]:
            try:
                with open(file, "rb") as f:
                    raw = f.read()
                images.append(network.preprocess(read_image(raw, Image.MAX_IMAGE_PIXELS)[0]))  # PIL's bomb limit
                good.append(file)
            except Exception as err:  # unreadable, not an image, truncated, too large
                failed.append(
                    (file, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}")
                )
        yield good, np.stack(images) if images else None, failed


def classify(network, files: list[str], batch_size: int, tta: str | None):
    """Yield (path, probabilities) for images that decode, (path, error) for those that do not."""
    from tqdm import tqdm

    with tqdm(total=len(files), unit="img", disable=None, file=sys.stderr) as bar:
        for good, images, failed in read_batches(network, files, batch_size):
            yield from failed
            if images is not None:
                batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
                probs = softmax(np.asarray(network.predict(batch), np.float32))
                if tta == "flip":
                    mirrored = np.ascontiguousarray(batch[..., ::-1])
                    probs = (probs + softmax(np.asarray(network.predict(mirrored), np.float32))) / 2
                yield from zip(good, probs)
            bar.update(len(good) + len(failed))


def predict(
    model: str,
    paths: list[str],
    output: str | None = None,
    fmt: Literal["csv", "json"] | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    tta: Literal["flip"] | None = None,
    threads: int | None = None,
    runtime: Literal[RUNTIMES] | None = None,
    min_confidence: float | None = None,
    target_precision: float | None = None,
) -> int:
    """Classify images with a model: cnnlab predict MODEL_URI PATH ... (a recipe's test split:
    cnnlab predict --config RECIPE --ckpt_path CKPT).

    Args:
        model: models:/NAME@ALIAS, models:/NAME/VERSION, a run id, a .ckpt ...
        paths: image files, folders, globs, or a CSV of paths
        output: the file to write (predictions.csv / .json; - for stdout)
        fmt: the output's format (from --output's suffix, else csv)
        top_k: labels per image (at most the class count)
        batch_size: images per model call
        tta: flip: average with the mirrored image
        threads: CPU threads of the runtime
        runtime: run an ONNX model on this runtime (the artifact's own by default)
        min_confidence: answer unsure (label empty, unsure true; the top-k still listed) below this top
            probability (default: the registered version's min_confidence tag, else always answer)
        target_precision: choose min_confidence as the lowest threshold whose answers were this precise on the
            model's validation split (recorded in the model)
    """
    if top_k < 1 or batch_size < 1:
        raise UserError("--top-k and --batch-size must be 1 or more.")
    fmt = fmt or ("json" if (output or "").endswith(".json") else "csv")
    output = output or f"predictions.{fmt}"
    if output != "-" and not Path(output).resolve().parent.is_dir():
        raise UserError(f"--output {output}: its folder does not exist. Create it or write elsewhere.")
    files, skipped = find_images(paths)
    if not files:
        raise UserError(
            f"no images found in {' '.join(paths)} ({', '.join(why for _, why in skipped) or 'no image files'}). "
            f"Pass image files, folders of images ({', '.join(IMAGE_EXTENSIONS[:4])} ...), globs or a CSV of paths."
        )
    from cnnlab import load
    from cnnlab.calibration import answer_threshold

    network = load.model(model, threads=threads, runtime=runtime)
    threshold, why = answer_threshold(network.meta, network.min_confidence, min_confidence, target_precision)
    if threshold:
        print(f"cnnlab: unsure below a top probability of {threshold} ({why})", file=sys.stderr)
    classes = network.classes
    k = min(top_k, len(classes))
    rows = []
    for path, result in classify(network, files, batch_size, tta):
        if isinstance(result, str):
            skipped.append((path, result))
            continue
        top = np.argsort(-result)[:k]
        rows.append((path, float(result[top[0]]) < threshold, [(classes[i], float(result[i])) for i in top]))
    write(rows, skipped, output, fmt, k, model)
    where = "stdout" if output == "-" else output
    unsure = f", {sum(r[1] for r in rows)} unsure (below {threshold})" if threshold else ""
    print(f"cnnlab: {len(rows)} images classified with {model}{unsure} -> {where}", file=sys.stderr)
    if skipped:
        print(f"cnnlab: {len(skipped)} skipped:", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
    return 0


def write(rows, skipped, output: str, fmt: str, k: int, model: str) -> None:
    out = sys.stdout if output == "-" else open(output, "w", newline="")
    try:
        if fmt == "json":
            json.dump(
                {
                    "model": model,
                    "predictions": [
                        {
                            "path": path,
                            "label": None if unsure else top[0][0],
                            "unsure": unsure,
                            "top": [{"label": label, "probability": round(p, 6)} for label, p in top],
                        }
                        for path, unsure, top in rows
                    ],
                    "skipped": [{"path": path, "error": why} for path, why in skipped],
                },
                out,
                indent=1,
            )
            out.write("\n")
            return
        writer = csv.writer(out)
        top_k = [f"{field}_{i}" for i in range(1, k + 1) for field in ("label", "probability")]
        writer.writerow(["path", "label", "unsure", *top_k])
        for path, unsure, top in rows:
            answer = "" if unsure else top[0][0]
            writer.writerow([path, answer, str(unsure).lower(), *[v for label, p in top for v in (label, f"{p:.6f}")]])
    finally:
        if out is not sys.stdout:
            out.close()
