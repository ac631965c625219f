"""Class-activation maps through pytorch-grad-cam: which part of an image made a network answer as it did. Used by
`cnnlab explain` and by the confident-mistakes gallery of every fit."""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")  # scorecam: a forward pass per channel of the layer


def default_layer(module: torch.nn.Module, image_size: int) -> str:
    """The deepest module whose output is still a map (N x C x H x W with H x W > 1) at this input size: the
    last convolutional stage (ResNet's `layer4` at 224 px; an earlier stage where a small input has shrunk to
    one pixel there)."""
    names = {id(m): n for n, m in module.named_modules() if n}
    finished = []

    def hook(m, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
            finished.append(names[id(m)])

    hooks = [m.register_forward_hook(hook) for n, m in module.named_modules() if n]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
    if not finished:
        raise ValueError(f"no layer of this network keeps a spatial map at {image_size} px: nothing to explain")
    return finished[-1]


class _Pixels(torch.nn.Module):
    """Score-CAM feeds masked images as floats; the network takes uint8 pixels."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8))


def maps(
    module: torch.nn.Module, layer: str, images: torch.Tensor, targets: list[int] | None = None, method: str = "gradcam"
) -> np.ndarray:
    """Maps in [0, 1] (N x H x W, at the images' size) of uint8 N x 3 x H x W images, for the class indices
    `targets` (the predicted ones by default)."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    kind = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "eigencam": EigenCAM}[method]
    try:
        target_layer = module.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"the network has no layer '{layer}'") from None
    with torch.inference_mode(False), torch.enable_grad(), kind(_Pixels(module), [target_layer]) as cam:
        cam.batch_size = 16  # Score-CAM's masked forward passes
        chosen = [ClassifierOutputTarget(int(t)) for t in targets] if targets is not None else None
        return cam(input_tensor=images.clone(), targets=chosen)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The map over an RGB uint8 H x W x 3 image, as RGB uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.55)


def sheet(tiles: list[tuple[np.ndarray, str]], path, title: str = "", columns: int = 8) -> None:
    """A contact sheet of captioned RGB tiles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(tiles) // columns))
    columns = min(columns, max(1, len(tiles)))
    aspect = tiles[0][0].shape[0] / tiles[0][0].shape[1] if tiles else 1  # height / width of a tile
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, (1.9 * aspect + 0.4) * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (tile, caption) in zip(axes.flat, tiles):
        ax.imshow(tile, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
