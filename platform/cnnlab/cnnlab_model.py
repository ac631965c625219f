"""The MLflow model of a cnnlab run: the `pytorch` flavor (a torch.export program taking uint8 N x 3 x H x W)
plus a `python_function` flavor that takes raw images and answers labels and class probabilities.

This file is copied into every logged model (its `code/` folder) and loaded from there, so it imports
nothing of cnnlab: `mlflow.pyfunc.load_model(...)` works with torch, numpy, pillow, opencv and pandas.
cnnlab's own evaluation uses the same `decode` and `center_crop`, so offline, served and logged
predictions see the same pixels.
"""

from __future__ import annotations

import io
import json
import os

import cv2
import numpy as np
from PIL import Image

META_FILE = "cnnlab.json"


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to RGB uint8; 16/32-bit grey keeps its top 8 bits instead of clipping."""
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode.startswith("I"):
        grey = np.asarray(image).astype(np.uint32)
        grey = (grey >> 8) if grey.max() > 255 else grey
        return np.repeat(grey.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def read_image(raw: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """Encoded bytes (any PIL format) to RGB uint8, and the original mode. Complete RGB/grey JPEGs go
    through OpenCV's decoder (same pixels as PIL's, faster); anything else through PIL."""
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        if max_pixels and width * height > max_pixels:
            raise OverflowError(f"{width}x{height} is over the pixel limit of {max_pixels}")
        if image.format == "JPEG" and image.mode in ("RGB", "L") and raw.rstrip(b"\0")[-2:] == b"\xff\xd9":
            array = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            if array is not None:
                return cv2.cvtColor(array, cv2.COLOR_BGR2RGB), image.mode
        image.load()
        return to_rgb(image), image.mode


def decode(item) -> np.ndarray:
    """Encoded bytes or an H x W [x C] uint8 array to RGB uint8 H x W x 3."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return read_image(bytes(item))[0]
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image array must be uint8 H x W, H x W x 1, x 3 or x 4; got {array.dtype} {array.shape}")
    if array.ndim == 2 or array.shape[2] == 1:
        array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def center_crop(image: np.ndarray, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Short side to size / crop_pct (area filter when shrinking), then the central size x size square."""
    height, width = image.shape[:2]
    scale = round(size / crop_pct) / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


class ImageClassifier:
    """The pyfunc: predict(DataFrame with an `image` column of encoded bytes or uint8 arrays)."""

    def __init__(self, model, meta: dict, batch_size: int = 64):
        self.model, self.meta, self.batch_size = model, meta, batch_size

    def probabilities(self, images: list) -> np.ndarray:
        import torch

        size, crop_pct = self.meta["image_size"], self.meta["crop_pct"]
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([center_crop(decode(x), size, crop_pct) for x in images[start:start + self.batch_size]])
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())
            out.append(logits.float().softmax(-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.meta["classes"])), np.float32)

    def predict(self, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            images = model_input["image"].tolist()
        elif isinstance(model_input, dict):
            images = list(model_input["image"])
        elif isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            images = list(model_input)
        else:
            images = list(model_input) if isinstance(model_input, list) else [model_input]
        probs = self.probabilities(images)
        classes = self.meta["classes"]
        return pd.DataFrame({"label": [classes[i] for i in probs.argmax(1)], "score": probs.max(1).astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probs]})


def _load_pyfunc(data_path: str, model_config=None) -> ImageClassifier:
    """MLflow's entry point for the python_function flavor."""
    import mlflow.pytorch

    with open(os.path.join(data_path, META_FILE)) as f:
        meta = json.load(f)
    model = mlflow.pytorch.load_model(os.path.dirname(os.path.abspath(data_path)))
    return ImageClassifier(model, meta)


def save_model(path: str, mlflow_model, pytorch_model, classes: list[str], image_size: int, crop_pct: float,
               example_images: list[bytes], pip_requirements: list[str] | None = None, **kwargs) -> None:
    """Write both flavors into `path` (called by `mlflow.models.Model.log(flavor=this module)`)."""
    import mlflow.pytorch
    import pandas as pd
    import torch
    from mlflow.models import ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    example = torch.stack([torch.from_numpy(center_crop(decode(b), image_size, crop_pct)).permute(2, 0, 1)
                           for b in example_images])
    tensor_signature = ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size))]))
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, serialization_format="pt2",
                              signature=tensor_signature, input_example=example.numpy(),
                              code_paths=[os.path.abspath(__file__)], pip_requirements=pip_requirements)
    data = mlflow_model.flavors["pytorch"]["model_data"]
    with open(os.path.join(path, data, META_FILE), "w") as f:
        json.dump({"classes": list(classes), "image_size": image_size, "crop_pct": crop_pct}, f)
    # Same folders and environment as the pytorch flavor's own pyfunc, but this module's loader.
    mlflow_model.flavors["python_function"]["loader_module"] = "cnnlab_model"
    mlflow_model.signature = ModelSignature(
        Schema([ColSpec(DataType.binary, "image")]),
        Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score"),
                ColSpec(Array(DataType.double), "probabilities")]))
    for old in ("input_example.json", "serving_input_example.json"):
        if os.path.exists(os.path.join(path, old)):
            os.remove(os.path.join(path, old))
    mlflow_model.saved_input_example_info = None
    _save_example(mlflow_model, pd.DataFrame({"image": list(example_images)}), path)
    mlflow_model.save(os.path.join(path, "MLmodel"))
