"""`cnnlab explain MODEL_URI PATH...`: where in each image the network looked for its answer. For every readable
image (files, folders, globs or a CSV of paths, as `predict` reads them) the class-activation map of the predicted
class (or `--target`) over the image as a PNG, and a contact sheet of all of them; from the model artifact alone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cnnlab import UserError
from cnnlab.cam import METHODS, default_layer, maps, overlay, sheet
from cnnlab.cnnlab_model import softmax
from cnnlab.predict import find_images, read_batches


def explain(
    model: str,
    paths: list[str],
    method: Literal[METHODS] = "gradcam",
    target: str | None = None,
    layer: str | None = None,
    out: str = "cams",
    batch_size: int = 16,
    threads: int | None = None,
) -> int:
    """Class-activation maps of a model's answers, overlaid on the images (PNG each, and contact_sheet.png).

    Args:
        model: models:/NAME@ALIAS, models:/NAME/V, a run, a logged-model id or a .ckpt: a torch model (an
            export's explanations come from the torch model it was exported from)
        paths: image files, folders, globs, or a CSV of paths
        method: gradcam, gradcam++, scorecam or eigencam (pytorch-grad-cam)
        target: explain this label instead of each image's predicted one
        layer: the module whose maps are used (default: the last one that still has a spatial map)
        out: the folder to write into (created)
        batch_size: images per step
        threads: CPU threads (default: torch's)
    """
    import torch

    from cnnlab import load

    files, skipped = find_images(paths)
    if not files:
        raise UserError(f"no images found in {' '.join(paths)}. Pass image files, folders of images, globs or a CSV.")
    network = load.model(model, threads=threads, unflatten=True)
    if network.engine != "torch":
        source = network.meta.get("source") or {}
        origin = (
            f"models:/{source['name']}/{source['version']}" if source.get("name") else source.get("uri") or "its source"
        )
        raise UserError(
            f"'{model}' runs on {network.engine}: explanations need the torch model it came from; "
            f"run cnnlab explain {origin} ..."
        )
    classes = network.classes
    if target is not None and target not in classes:
        raise UserError(f"--target {target}: not a class of this model ({', '.join(classes[:20])}).")
    module = network.module.eval()
    try:
        layer = layer or default_layer(module, network.image_size)
        module.get_submodule(layer)
    except (ValueError, AttributeError) as err:
        raise UserError(f"--layer {layer}: {err}. Name a module of the network (e.g. net.layer4).") from None
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tiles, written = [], 0
    for good, batch, failed in read_batches(network, files, batch_size):
        skipped += failed
        if batch is None:
            continue
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        probs = softmax(network.predict(x.numpy()))
        chosen = [classes.index(target)] * len(good) if target is not None else list(probs.argmax(1))
        for file, image, heat, row, c in zip(good, batch, maps(module, layer, x, chosen, method), probs, chosen):
            picture = overlay(image, heat)
            scale = max(1, 224 // picture.shape[0])  # small inputs enlarged, pixels kept sharp
            big = np.kron(picture, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else picture
            Image.fromarray(big).save(folder / f"{written:04d}-{Path(file).stem}.png")
            tiles.append((picture, f"{Path(file).name[:18]}\n{classes[c]} {row[c]:.2f}"))
            written += 1
    if tiles:
        sheet(
            tiles,
            folder / "contact_sheet.png",
            f"{method} of {'target ' + target if target else 'the answer'}, {layer}",
        )
    print(f"cnnlab: {written} maps ({method}, layer {layer}) -> {folder}/ (contact_sheet.png)", file=sys.stderr)
    if skipped:
        print(f"cnnlab: {len(skipped)} skipped:", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
    if not written:
        raise UserError("no image could be read: nothing explained.")
    return 0
