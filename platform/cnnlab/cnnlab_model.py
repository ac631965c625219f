"""The cnnlab model: one self-contained MLflow model (a `python_function` flavor) holding everything
inference needs, described by `cnnlab.json` (schema below, versioned by SCHEMA):

    network.pt2 | network.onnx | network.ts   the network, taking uint8 N x 3 x H x W RGB, returning logits
                                              (it normalizes itself): a torch.export program, an ONNX
                                              model (fp32 or int8) or TorchScript
    cpu.onnx      a fit's program again as ONNX (`cpu_network`), which CPUs run on ONNX Runtime
    cnnlab.json   schema, classes, image_size, crop_pct, mean, std, preprocess, input, output, runtime,
                  format, network, cpu_network, files (the sha256 of each network file), samples, data (the
                  source it was trained on), source (what an export was made from), checks (an export's parity)
    samples/      a few encoded images with their labels (`samples` in cnnlab.json), for parity checks

The model's digest is the sha256 of its cnnlab.json (which holds the sha256 of every network file), recorded
in the MLmodel's metadata (`cnnlab.sha256`) and in the model's tags; every load checks both before the
network is read, so a changed or damaged file is refused in one line naming it.

A fit logs one (runtime torch, with its ONNX twin for CPUs: 3-5x faster there at batch 1, see
benchmarks/README.md; the torch program stays for GPUs, distillation, fine-tuning and explanations); `cnnlab
export` writes the same kind with another network. This file is
copied into every model (its `code/` folder) and is its pyfunc loader, so it imports nothing of cnnlab:
`mlflow.pyfunc.load_model(...)` needs numpy, pandas, pillow, opencv and the runtime (torch or onnxruntime).
cnnlab itself loads models through `load_network`, so the gate, the server, exports and the pyfunc run
the same file on the same runtime with the same preprocessing.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

META_FILE = "cnnlab.json"
SCHEMA = 2  # 2: `files` holds each network file's sha256, the digest is cnnlab.json's (1: `sha256` of the network)
NETWORK_FILES = {"torch": "network.pt2", "onnx": "network.onnx", "torchscript": "network.ts", "openvino": "network.xml"}
RUNTIMES = ("onnxruntime", "openvino")  # the runtimes that may run another's network file (--runtime)
CPU_FILE = "cpu.onnx"  # a fit's ONNX twin of its program
PREPROCESS = (
    "decode to RGB uint8; resize the short side to image_size / crop_pct (area filter when shrinking, "
    "`interpolation` when enlarging, default bilinear); center crop image_size x image_size; N x 3 x H x W"
)
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


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


def center_crop(image: np.ndarray, size: int, crop_pct: float = 1.0, interpolation: str | None = None) -> np.ndarray:
    """Short side to size / crop_pct (area filter when shrinking, `interpolation` when enlarging), then the central size x size square. An image
    to be enlarged that is far longer than wide keeps only the middle of its long side first, so a
    1 x 2,500,000 strip never grows into a 16 x 40,000,000 one (shrinking images are never cut first)."""
    height, width = image.shape[:2]
    scale = round(size / crop_pct) / min(height, width)
    keep = int(np.ceil(8 * size / scale)) + 2  # eight crops' worth, in source pixels
    if scale <= 1 or max(height, width) <= keep:
        pass
    elif height > width:
        image = image[(height - keep) // 2 : (height - keep) // 2 + keep]
    elif width > keep and width > height:
        image = image[:, (width - keep) // 2 : (width - keep) // 2 + keep]
    height, width = image.shape[:2]
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        enlarge = INTERPOLATIONS[interpolation or "bilinear"]
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else enlarge)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def default_crop_pct(image_size: int) -> float:
    """Small images are used whole; larger ones center-cropped as the ImageNet references do."""
    return 1.0 if image_size <= 64 else 0.875


def network_files(network: Path) -> list[Path]:
    """The network file and, for OpenVINO's .xml, the .bin of its weights."""
    return [network, network.with_suffix(".bin")] if network.suffix == ".xml" else [network]


def sha256(*paths: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def recorded_digest(model_folder) -> str | None:
    """The digest an MLflow model folder's MLmodel recorded for it (None when it has no MLmodel)."""
    import yaml

    mlmodel = Path(model_folder) / "MLmodel"
    if not mlmodel.is_file():
        return None
    return ((yaml.safe_load(mlmodel.read_text()).get("metadata") or {}).get("cnnlab") or {}).get("sha256")


def verify(folder: Path, recorded: str | None = None) -> str:
    """The digest of the model in `folder` (sha256 of its cnnlab.json), once cnnlab.json matches `recorded` and
    every network file the sha256 cnnlab.json holds for it; otherwise a ValueError naming the file."""
    import hashlib

    meta_file = folder / META_FILE
    raw = meta_file.read_bytes()
    digest, meta = hashlib.sha256(raw).hexdigest(), json.loads(raw)
    legacy = meta.get("schema", 0) < 2  # its digest was the network file's
    if recorded and not legacy and digest != recorded:
        raise ValueError(f"{meta_file} was changed after the model was saved: sha256 {digest}, recorded {recorded}")
    files = {meta["network"]: meta.get("sha256")} if legacy else meta.get("files", {})
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (recorded sha256 {expected})")
        actual = sha256(*network_files(path)) if legacy else sha256(path)
        if expected and actual != expected:
            raise ValueError(
                f"{path} is damaged or was changed ({path.stat().st_size:,} bytes): sha256 {actual}, recorded {expected}"
            )
    return meta["sha256"] if legacy else digest


@dataclass
class Network:
    """A loaded model: `predict` maps uint8 N x 3 x H x W (numpy) to logits; `meta` is its cnnlab.json."""

    predict: Callable[[np.ndarray], np.ndarray]
    meta: dict
    module: object = None  # the torch module (runtime torch/torchscript), for distillation and fine-tuning
    source: str = ""  # the URI it was loaded from
    name: str | None = None  # registered model name, version and alias, where it came from the registry
    version: str | None = None
    alias: str | None = None
    params: int = 0
    samples: list[tuple[bytes, int]] = field(default_factory=list)  # encoded sample images and their labels
    engine: str = "torch"  # what runs it: torch, torchscript, onnxruntime or openvino
    digest: str = ""  # sha256 of the cnnlab.json it was loaded from, checked with every file it lists
    min_confidence: float = 0.0  # below this top probability the answer is "unsure" (a version's tag sets it)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def runtime(self) -> str:
        return self.meta["runtime"]

    def preprocess(self, item) -> np.ndarray:
        """Encoded bytes or an H x W [x C] uint8 array to the H x W x 3 input the network takes."""
        return center_crop(decode(item), self.meta["image_size"], self.meta["crop_pct"], self.meta.get("interpolation"))

    def logits(self, images: list, batch_size: int = 64) -> np.ndarray:
        """Logits of encoded images or uint8 arrays, through the model's own preprocessing, in batches."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(x) for x in images[start : start + batch_size]])
            out.append(np.asarray(self.predict(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))), np.float32))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, images: list, batch_size: int = 64) -> np.ndarray:
        return softmax(self.logits(images, batch_size))


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def torch_predict(module, device: str = "cpu"):
    import torch

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return predict


def engine_of(meta: dict, runtime: str | None = None, device: str = "cpu", program: bool = False) -> str:
    """What runs a model's network: its own runtime, or `runtime` where that one can run it (ValueError else).
    A program with an ONNX twin runs the twin on ONNX Runtime on a CPU where onnxruntime is installed, unless
    the `program` itself is wanted (and on a GPU)."""
    from importlib.util import find_spec

    own, twin = meta["runtime"], bool(meta.get("cpu_network"))
    if runtime is None and twin and not program and device == "cpu" and find_spec("onnxruntime"):
        return "onnxruntime"
    runtime = runtime or {"onnx": "onnxruntime"}.get(own, own)
    onnx = own == "onnx" or twin
    if runtime != own and not (onnx and runtime in RUNTIMES):
        raise ValueError(f"a {own} network cannot run on {runtime}: export it to ONNX (or OpenVINO) first")
    return runtime


def network_file(folder: Path, meta: dict, engine: str) -> Path:
    """The file `engine` runs: a program's ONNX twin on ONNX Runtime or OpenVINO, else the network."""
    return folder / (meta["cpu_network"] if engine in RUNTIMES and meta["runtime"] == "torch" else meta["network"])


def write_onnx(module, image_size: int, path: Path) -> Path:
    """A torch module (or exported program) as an ONNX graph at `path`, any batch size."""
    import torch

    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():  # a program's module says "training mode": its graph was traced for inference
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            verbose=False,  # no progress lines
            external_data=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        )
    return path


def load_network(
    folder,
    threads: int | None = None,
    device: str = "cpu",
    runtime: str | None = None,
    recorded: str | None = None,
    unflatten: bool = False,
    program: bool = False,
) -> Network:
    """The network of a model's data folder (where cnnlab.json lies), on its own runtime, or on `runtime`:
    `openvino` runs an ONNX or OpenVINO network with OpenVINO, `onnxruntime` an ONNX one with ONNX Runtime.
    Its files are checked first (`verify`, against the `recorded` digest when given). `unflatten`: a torch
    program keeps its modules (`net.layer4` ...) for hooks, at some speed. `program`: a fit's torch program
    with its module (for distillation, fine-tuning, exports), not its ONNX twin."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("schema", 0) > SCHEMA:
        raise ValueError(
            f"{folder / META_FILE} has schema {meta['schema']}; this code reads up to {SCHEMA}: upgrade cnnlab"
        )
    digest = verify(folder, recorded)
    runtime = engine_of(meta, runtime, device, program or unflatten)
    file = network_file(folder, meta, runtime)
    samples = [((folder / s["file"]).read_bytes(), s["label"]) for s in meta.get("samples", [])]
    if runtime == "onnxruntime":
        predict, params = load_onnx(file, threads, device)
        return Network(predict, meta, params=params, samples=samples, engine=runtime, digest=digest)
    if runtime == "openvino":
        predict, params = _openvino(file, threads, device)
        return Network(predict, meta, params=params, samples=samples, engine=runtime, digest=digest)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if runtime == "torch":
        program = torch.export.load(str(file))
        module = torch.export.unflatten(program) if unflatten else program.module()
    elif runtime == "torchscript":
        module = torch.jit.load(str(file), map_location="cpu")
    else:
        raise ValueError(f"{folder / META_FILE}: unknown runtime {runtime!r}")
    module = module.to(device)
    return Network(
        torch_predict(module, device),
        meta,
        module=module,
        params=sum(p.numel() for p in module.parameters()),
        samples=samples,
        engine=runtime,
        digest=digest,
    )


def load_onnx(file: Path, threads: int | None, device: str):
    """An ONNX Runtime session; on `cuda[:N]` TensorRT's or CUDA's execution provider where this onnxruntime
    has one (onnxruntime-gpu: pip install "cnnlab[gpu]"), else the CPU, said in one line."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device != "cpu":
        index = {"device_id": int(device.partition(":")[2] or 0)}
        found = ort.get_available_providers()
        providers = [(p, index) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in found]
        providers.append("CPUExecutionProvider")
    session = ort.InferenceSession(str(file), options, providers=providers)
    if device != "cpu" and session.get_providers()[0] == "CPUExecutionProvider":
        print(
            f"cnnlab: onnxruntime {ort.__version__} has no working CUDA or TensorRT provider here "
            f"(available: {', '.join(ort.get_available_providers())}); {file.name} runs on the CPU. "
            'For the GPU: pip uninstall onnxruntime && pip install "cnnlab[gpu]".',
            file=sys.stderr,
        )
    name = session.get_inputs()[0].name
    params = sum(numpy_helper.to_array(t).size for t in onnx.load(str(file)).graph.initializer)
    return (lambda x: session.run(None, {name: x})[0]), params


def _openvino(file: Path, threads: int | None, device: str):
    """An OpenVINO compiled model (an .xml IR or an .onnx file) on its CPU plug-in (`cuda` is refused: OpenVINO
    targets Intel hardware)."""
    if device != "cpu":
        raise ValueError(f"OpenVINO runs on the CPU here, not {device}; serve the ONNX model with onnxruntime")
    try:
        import openvino as ov
    except ImportError:
        raise ValueError('OpenVINO is not installed: pip install "cnnlab[openvino]"') from None
    core = ov.Core()
    model = core.read_model(str(file))
    # f32 where OpenVINO would pick bf16 on its own (CPUs with AVX512-BF16/AMX): the model computes as exported
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = core.compile_model(model, "CPU", config)
    params = sum(
        int(np.prod(op.get_output_shape(0)))
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) > 1
    )
    local = threading.local()  # an infer request serves one call at a time: one per thread

    def predict(x: np.ndarray) -> np.ndarray:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        return np.array(local.request.infer({0: x})[0])  # a copy: the request reuses its output tensor

    return predict, params


class ImageClassifier:
    """The pyfunc: predict(DataFrame with an `image` column of encoded bytes or uint8 arrays)."""

    def __init__(self, network: Network):
        self.network = network

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
        probs = self.network.probabilities(images)
        classes = self.network.classes
        return pd.DataFrame(
            {
                "label": [classes[i] for i in probs.argmax(1)],
                "score": probs.max(1).astype(float),
                "probabilities": [row.astype(float).tolist() for row in probs],
            }
        )


def _load_pyfunc(data_path: str, model_config=None) -> ImageClassifier:
    """MLflow's entry point for the python_function flavor (MLflow keeps the data in MODEL/data/NAME)."""
    return ImageClassifier(load_network(data_path, recorded=recorded_digest(Path(data_path).parents[1])))


def data_folder(model_folder) -> Path:
    """The folder of cnnlab.json inside an MLflow model folder."""
    import yaml

    mlmodel = yaml.safe_load((Path(model_folder) / "MLmodel").read_text())
    return Path(model_folder) / mlmodel["flavors"]["python_function"]["data"]


def write_meta(
    folder: Path, network: Path, meta: dict, samples: list[tuple[bytes, int]], cpu_network: Path | None = None
) -> dict:
    """cnnlab.json beside the network file (and its ONNX twin), with the sample images; returns the full
    metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples").mkdir(exist_ok=True)
    rows = []
    for i, (raw, label) in enumerate(samples):
        with Image.open(io.BytesIO(raw)) as image:
            suffix = (image.format or "img").lower()
        (folder / "samples" / f"{i:03d}.{suffix}").write_bytes(raw)
        rows.append({"file": f"samples/{i:03d}.{suffix}", "label": int(label)})
    meta = {
        "schema": SCHEMA,
        **meta,
        "network": network.name,
        **({"cpu_network": cpu_network.name} if cpu_network else {}),
        "files": {
            path.name: sha256(path) for path in [*network_files(network), *([cpu_network] if cpu_network else [])]
        },
        "bytes": sum(path.stat().st_size for path in network_files(network)),
        "samples": rows,
        "preprocess": PREPROCESS,
        "output": "logits",
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": [-1, 3, meta["image_size"], meta["image_size"]],
            "layout": "N x 3 x H x W, RGB, 0..255",
        },
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def signature():
    """The pyfunc's signature: one binary `image` column in; label, score and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        Schema([ColSpec(DataType.binary, "image")]),
        Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "score"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )


def save_model(path, folder: Path, meta: dict) -> str:
    """An MLflow model at `path` whose pyfunc is this module, loading `folder` (network, cnnlab.json, samples);
    returns its digest (recorded in the MLmodel)."""
    from importlib.metadata import version

    import mlflow.pyfunc
    import pandas as pd

    runtime = {"onnx": ["onnxruntime", "onnx"], "openvino": ["openvino"]}.get(
        meta["runtime"],
        [f"torch=={version('torch').split('+')[0]}", *(["onnxruntime"] if "cpu_network" in meta else [])],
    )
    examples = [(folder / s["file"]).read_bytes() for s in meta["samples"][:2]]
    digest = verify(folder)
    mlflow.pyfunc.save_model(
        str(path),
        loader_module="cnnlab_model",
        data_path=str(folder),
        code_paths=[os.path.abspath(__file__)],
        signature=signature(),
        input_example=pd.DataFrame({"image": examples}) if examples else None,
        pip_requirements=[*runtime, "numpy", "pandas", "pillow", "opencv-python-headless", "pyyaml"],
        metadata={
            "cnnlab": {
                "sha256": digest,
                **{k: meta[k] for k in ("schema", "runtime", "format", "image_size", "classes")},
            }
        },
    )
    return digest
