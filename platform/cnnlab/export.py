"""`cnnlab export MODEL_URI`: ONNX (fp32, or static int8 through ONNX Runtime) or TorchScript, checked
against the torch model on the test split, logged to MLflow and optionally registered (ONNX flavor).

Every exported model takes uint8 images N x 3 x H x W (the network normalizes them) and returns logits;
`cnnlab.json` beside it holds the classes, input size and crop, for a server to preprocess with.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from cnnlab import UserError

FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx", "torchscript": "model.pt"}


def load_trained(uri: str):
    """(ClassifierModule in eval mode on the CPU, its DataModule rebuilt from the checkpoint, checkpoint path)."""
    from cnnlab.data import DataModule
    from cnnlab.module import ClassifierModule
    from cnnlab.registry import checkpoint_of

    path = checkpoint_of(uri)
    module = ClassifierModule.load_from_checkpoint(path, map_location="cpu", pretrained=False, init_weights=None)
    saved = torch.load(path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters") or {}
    accepted = inspect.signature(DataModule).parameters
    datamodule = DataModule(**{**{k: v for k, v in saved.items() if k in accepted}, "num_workers": 0})
    return module.eval(), datamodule, path


def batches(datamodule, split: str, limit: int | None = None, batch_size: int = 64):
    """(uint8 images, labels) of a split with the evaluation preprocessing, no augmentation."""
    from cnnlab.data import ImageDataset, collate, eval_transform

    samples = datamodule.splits[split]
    dataset = ImageDataset(samples, eval_transform(datamodule.image_size, datamodule.crop_pct), datamodule.image_size,
                           datamodule.hparams.max_pixels, skip_bad=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        if batch is not None:
            yield batch


def to_onnx(module, image_size: int, path: Path) -> Path:
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, input_names=["images"],
                      output_names=["logits"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    return path


def to_int8(fp32: Path, path: Path, datamodule, calib_batches: int) -> Path:
    """Static post-training quantization, QOperator U8S8 (fast on CPU), calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = (images.numpy() for images, _ in batches(datamodule, "train", calib_batches, 32))

        def get_next(self):
            images = next(self.batches, None)
            return None if images is None else {"images": images}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return path


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(module, predict, datamodule, split: str) -> dict:
    """The exported model against the torch model: max |logit difference|, top-1 agreement, both accuracies."""
    diff, agree, correct_torch, correct_export, total = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for images, labels in batches(datamodule, split):
            ours = module(images).float().numpy()
            theirs = predict(images.numpy())
            diff = max(diff, float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
            correct_torch += int((ours.argmax(1) == labels.numpy()).sum())
            correct_export += int((theirs.argmax(1) == labels.numpy()).sum())
            total += len(labels)
    return {"max_abs_diff": diff, "top1_agreement": agree / total, "torch_acc": correct_torch / total,
            "acc": correct_export / total, "images": total}


def export(uri: str, out: str, fmt: str = "onnx", int8: bool = False, calib_batches: int = 10,
           register: str | None = None) -> dict:
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"--format {fmt}: choose onnx or torchscript.")
    if int8 and fmt != "onnx":
        raise UserError("--int8 quantizes ONNX models: use it with --format onnx.")
    module, datamodule, checkpoint = load_trained(uri)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    split = "test" if "test" in datamodule.splits else "val"
    meta = {"classes": module.classes, "image_size": datamodule.image_size, "crop_pct": datamodule.crop_pct,
            "input": "uint8 images, N x 3 x H x W", "output": "logits", "source": uri}
    if fmt == "torchscript":
        path = folder / FILES["torchscript"]
        traced = torch.jit.trace(module, torch.zeros(2, 3, datamodule.image_size, datamodule.image_size,
                                                     dtype=torch.uint8))
        traced.save(str(path))
        checks = parity(module, lambda x: traced(torch.from_numpy(x)).float().numpy(), datamodule, split)
    else:
        fp32 = to_onnx(module, datamodule.image_size, folder / FILES["onnx"])
        path = to_int8(fp32, folder / FILES["int8"], datamodule, calib_batches) if int8 else fp32
        session = ort_session(path)
        checks = parity(module, lambda x: session.run(None, {"images": x})[0], datamodule, split)
    meta.update(format="int8" if int8 else fmt, file=path.name, checks=checks)
    (folder / "cnnlab.json").write_text(json.dumps(meta, indent=2))
    print(f"exported {uri} -> {path} ({path.stat().st_size / 1e6:.1f} MB)\n"
          f"parity on {checks['images']} {split} images: max |logit diff| {checks['max_abs_diff']:.2e}, top-1 "
          f"agreement {checks['top1_agreement']:.4f}; top-1 {checks['acc']:.4f} (torch {checks['torch_acc']:.4f})")
    meta["run_id"], meta["version"] = _track(folder, path, meta, register, checkpoint)
    return meta


def _track(folder: Path, path: Path, meta: dict, register: str | None, checkpoint: Path) -> tuple[str, str | None]:
    """An MLflow run holding the files and checks; with --register, a new ONNX-flavor version of NAME."""
    import mlflow

    from cnnlab.registry import _client

    client = _client()
    source_run = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else None
    mlflow.set_experiment("cnnlab")
    tags = {"cnnlab.role": "export", "cnnlab.export.source": meta["source"], "cnnlab.export.format": meta["format"]}
    with mlflow.start_run(run_name=f"export-{meta['format']}", tags=tags) as run:
        mlflow.log_metrics({f"export/{k}": v for k, v in meta["checks"].items()})
        mlflow.log_metric("test/acc", meta["checks"]["acc"])
        mlflow.log_artifacts(str(folder), "export")
        version = None
        if register and path.suffix == ".onnx":
            import onnx

            info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name=register,
                                         metadata={"cnnlab": {k: meta[k] for k in ("classes", "image_size", "crop_pct")}})
            version = str(info.registered_model_version)
            for key, value in {"variant": meta["format"], "source": meta["source"], "run_id": run.info.run_id,
                               "test/acc": f"{meta['checks']['acc']:.6g}",
                               "export/top1_agreement": f"{meta['checks']['top1_agreement']:.6g}",
                               "export/max_abs_diff": f"{meta['checks']['max_abs_diff']:.3g}",
                               **({"parent_run": source_run} if source_run else {})}.items():
                client.set_model_version_tag(register, version, key, value)
            print(f"registered {register} v{version} (ONNX flavor, {meta['format']})")
        elif register:
            print("--register takes ONNX exports only; the TorchScript file is logged to the run.")
    return run.info.run_id, version


def predictor(uri: str, threads: int | None = None, backend: str | None = None, device: str = "cpu"):
    """(predict(uint8 N x 3 x H x W numpy) -> logits, label, params, file bytes, meta) for an export folder,
    an ONNX-flavor registered version, or any torch model (checkpoint, run, registered version). A torch
    model runs eagerly (`backend` torch, the default) or is exported to ONNX first (`backend` onnx)."""
    import mlflow

    folder = Path(uri)
    if uri.startswith("models:/") and not folder.exists():
        from cnnlab.registry import _client

        _client()
        local = Path(mlflow.artifacts.download_artifacts(uri))
        model = mlflow.models.Model.load(str(local))
        if "onnx" in model.flavors:
            _require_cpu(backend, device)
            return _onnx(local / model.flavors["onnx"]["data"], threads, uri, model.metadata["cnnlab"])
    if folder.is_dir() and (folder / "cnnlab.json").exists():
        meta = json.loads((folder / "cnnlab.json").read_text())
        file = folder / meta["file"]
        if file.suffix == ".onnx":
            _require_cpu(backend, device)
            return _onnx(file, threads, f"{folder.name} ({meta['format']})", meta)
        scripted = torch.jit.load(str(file), map_location=device)
        return (lambda x: scripted(torch.from_numpy(x).to(device)).float().cpu().numpy(), f"{folder.name} (torchscript)",
                sum(p.numel() for p in scripted.parameters()), file.stat().st_size, meta)
    module, datamodule, _ = load_trained(uri)
    meta = {"classes": module.classes, "image_size": datamodule.image_size, "crop_pct": datamodule.crop_pct}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(module.net.state_dict(), Path(tmp) / "weights.pt")
        size = (Path(tmp) / "weights.pt").stat().st_size
        if backend == "onnx":
            _require_cpu(backend, device)
            onnx_file = to_onnx(module, datamodule.image_size, Path(tmp) / "model.onnx")
            predict, _, params, _, _ = _onnx(onnx_file, threads, uri, meta)
            return predict, f"{uri} (onnx)", params, size, meta
    module.to(device)

    def predict(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return predict, f"{uri} (torch)", sum(p.numel() for p in module.parameters()), size, meta


def _require_cpu(backend: str | None, device: str) -> None:
    if device != "cpu":
        raise UserError(f"--device {device}: the ONNX backend runs on the CPU here (onnxruntime's CPU build); "
                        "serve on a GPU with --backend torch.")


def _onnx(path: Path, threads, label, meta):
    import onnx
    from onnx import numpy_helper

    session = ort_session(path, threads)
    params = sum(numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer)
    return lambda x: session.run(None, {"images": x})[0], label, params, path.stat().st_size, meta

