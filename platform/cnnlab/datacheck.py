"""`cnnlab data check SOURCE`: every image of a source opened and decoded, and every problem named."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from cnnlab import UserError
from cnnlab.sources import (
    BadImageError,
    Samples,
    check_classes,
    open_image,
    read_source,
    resolve_path,
    scan_folder,
    shard_list,
)

MODE_NAMES = {
    "L": "grey",
    "LA": "grey+alpha",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
    "P": "palette",
    "1": "1-bit",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit grey",
    "F": "float grey",
    "YCbCr": "YCbCr",
    "PA": "palette+alpha",
}


def check(source: str, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> dict:
    """Returns {'splits': {split: n}, 'classes': [...], 'modes': Counter, 'errors': [(where, what)], 'ignored': [...]}."""
    errors, ignored = [], []
    path = resolve_path(source)
    if source not in ("digits", "synthetic") and path.is_dir() and not shard_list(source):
        scan = scan_folder(path)
        classes, splits, ignored = scan["classes"], scan["splits"], scan["ignored"]
        check_classes(classes, source)
        errors += [(str(d), "class folder with no images") for d in scan["empty"]]
    else:
        classes, splits = read_source(source)
    samples = [(split, s, i) for split, s in splits.items() for i in range(len(s))]
    modes: Counter = Counter()

    def inspect(entry: tuple[str, Samples, int]):
        _, s, i = entry
        if isinstance(s.items[i], int):
            return None, "RGB"
        try:
            return None, open_image(s.items[i], max_pixels)[1]
        except BadImageError as err:
            return (s.name(i), str(err)), None

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for error, mode in pool.map(inspect, samples, chunksize=64):
            if error:
                errors.append(error)
            else:
                modes[mode] += 1
    counts = Counter(label for s in splits.values() for label in s.labels)
    return {
        "classes": classes,
        "counts": {name: counts[i] for i, name in enumerate(classes)},
        "splits": {k: len(v) for k, v in splits.items()},
        "modes": modes,
        "errors": errors,
        "ignored": [str(p) for p in ignored],
    }


def report(source: str, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> int:
    """Check a data source: unreadable, truncated, non-image, odd-mode and oversized images, class counts; exit
    status 1 when anything is unusable.

    Args:
        source: ImageFolder root, CSV manifest, WebDataset shards (folder, URL, brace pattern), digits or synthetic
        max_pixels: pixel limit per image (PIL's)
    """
    result = check(source, max_pixels)
    total = sum(result["splits"].values())
    splits = ", ".join(f"{k} {v:,}" for k, v in result["splits"].items())
    print(f"{source}: {total:,} images in {len(result['classes'])} classes ({splits})")
    counts = sorted(result["counts"].items(), key=lambda kv: kv[1])
    if counts:
        ratio = counts[-1][1] / max(1, counts[0][1])
        shown = ", ".join(f"{name} {n:,}" for name, n in counts[:3]) + (" ..." if len(counts) > 3 else "")
        advice = " (imbalanced: consider model.class_weights: balanced or data.sampler: balanced)" if ratio >= 3 else ""
        print(f"class counts, fewest first: {shown}; imbalance ratio (largest / smallest) {ratio:.1f}{advice}")
    odd = {m: n for m, n in result["modes"].items() if m != "RGB"}
    if odd:
        print("converted to RGB: " + ", ".join(f"{n:,} {MODE_NAMES.get(m, m)} ({m})" for m, n in sorted(odd.items())))
    if result["ignored"]:
        shown = ", ".join(result["ignored"][:5]) + (" ..." if len(result["ignored"]) > 5 else "")
        print(f"ignored (no image extension): {len(result['ignored'])}: {shown}")
    if not result["errors"]:
        print("ok: every image is usable")
        return 0
    print(f"unusable ({len(result['errors'])}):")
    for where, what in result["errors"]:
        print(f"  {where}: {what}")
    print("Fix or remove them, or train with data.on_bad_image: skip (bad images are then skipped and counted).")
    return 1


def preview_recipe(*, recipe: str, out: str = "preview.png", n: int = 32) -> int:
    """Write a PNG grid of augmented training samples of a recipe's data.

    Args:
        recipe: the recipe YAML
        out: where to write the PNG
        n: how many samples
    """
    import yaml
    from jsonargparse import ArgumentParser

    from cnnlab.data import DataModule, preview

    if not Path(recipe).exists():
        raise UserError(f"--config {recipe}: no such file.")
    data = (yaml.safe_load(Path(recipe).read_text()) or {}).get("data") or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DataModule, "data")
    try:
        config = parser.parse_object({"data": data})
    except Exception as err:
        raise UserError(f"{recipe}: the data section is not valid: {err}") from None
    datamodule = parser.instantiate_classes(config).data
    path = preview(datamodule, Path(out), n)
    print(f"wrote {path}: {n} augmented training samples of {datamodule.source}")
    return 0
