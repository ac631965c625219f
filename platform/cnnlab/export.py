"""`cnnlab export MODEL_URI --out DIR`: the model as ONNX (fp32, or static int8 through ONNX Runtime), OpenVINO
IR (fp32, or int8 through NNCF's post-training quantization) or TorchScript, written as a cnnlab model of the
same kind (cnnlab_model: the new network beside the source's classes, preprocessing and sample images),
checked against the source, logged to MLflow and optionally registered, linked to its source by tags.

It reads the model artifact alone. Parity is checked on the model's own sample images; with `--data`, also
on that source's test split. int8 calibrates on training images: `--data`, else the data the model records.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from cnnlab import UserError, load, store
from cnnlab.cnnlab_model import META_FILE, NETWORK_FILES, Network, load_network, save_model, write_meta, write_onnx
from cnnlab.evaluate import agreement, scores

FORMATS = ("onnx", "openvino", "torchscript")
INT8_FILE = "network.int8.onnx"
# what an export takes over from its source's cnnlab.json (its network already divides by the temperature)
KEPT = ("classes", "image_size", "crop_pct", "interpolation", "mean", "std", "model", "data", "run_id")
KEPT += ("temperature", "calibration")


def to_int8(fp32: Path, path: Path, batches) -> Path:
    """Static post-training quantization, QOperator U8S8 per channel (fast on CPU), calibrated on `batches`
    of images in the model's own evaluation preprocessing."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return path


def openvino_installed() -> bool:
    """Whether `--format openvino` can run here (OpenVINO and NNCF: pip install "cnnlab[openvino]")."""
    from importlib.util import find_spec

    return find_spec("openvino") is not None and find_spec("nncf") is not None


def to_openvino(onnx: Path, path: Path, batches=None) -> Path:
    """OpenVINO IR (.xml + .bin) converted from the ONNX file; with `batches`, quantized to int8 by NNCF
    (OpenVINO's post-training quantization: per-channel weights, calibrated activations, bias correction)."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError('--format openvino needs OpenVINO: pip install "cnnlab[openvino]".') from None
    model = ov.convert_model(str(onnx))
    if batches is not None:
        import nncf

        calibration = list(batches)
        model = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def parity(reference: Network, exported: Network, images: list, labels: list[int]) -> dict:
    """The exported network against its source on the same images: max |logit difference|, top-1 agreement,
    both accuracies."""
    ours, theirs = reference.logits(images), exported.logits(images)
    classes = len(reference.classes)
    return {
        **agreement(ours, theirs),
        "source_acc": scores(ours, labels, classes)["test/acc"],
        "acc": scores(theirs, labels, classes)["test/acc"],
        "images": len(images),
    }


def calibration(source: Network, samples, calib_batches: int, batch: int = 32):
    """Batches of `samples` (training images), preprocessed as the model does (N x 3 x H x W uint8), for int8
    calibration."""
    picks = np.random.default_rng(0).permutation(len(samples))[: calib_batches * batch]
    for start in range(0, len(picks), batch):
        images = [source.preprocess(samples.raw(int(i), source.image_size)) for i in picks[start : start + batch]]
        yield np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def convert(source: Network, folder: Path, fmt: str, int8: bool = False, train=None, calib_batches: int = 10) -> dict:
    """The source's network written into `folder` as `fmt` (int8 calibrated on `train`, training samples),
    with its cnnlab.json; returns that."""
    folder.mkdir(parents=True)
    size = source.image_size
    if fmt == "torchscript":
        import torch

        path = folder / NETWORK_FILES["torchscript"]
        with torch.no_grad():
            torch.jit.trace(source.module, torch.zeros(2, 3, size, size, dtype=torch.uint8)).save(str(path))
    else:
        onnx = write_onnx(source.module, size, folder / "graph.onnx")
        batches = calibration(source, train, calib_batches) if int8 else None
        if fmt == "openvino":
            path = to_openvino(onnx, folder / NETWORK_FILES["openvino"], batches)
        elif int8:
            path = to_int8(onnx, folder / INT8_FILE, batches)
        else:
            path = onnx.rename(folder / NETWORK_FILES["onnx"])
        onnx.unlink(missing_ok=True)
    keep = {k: v for k, v in source.meta.items() if k in KEPT}
    lineage = {
        "uri": source.source,
        "sha256": source.digest,
        "format": source.meta.get("format"),
        "name": source.name,
        "version": source.version,
    }
    form = f"{fmt}-int8" if int8 else fmt
    return write_meta(folder, path, {**keep, "runtime": fmt, "format": form, "source": lineage}, source.samples)


def export(
    uri: str,
    *,
    out: str,
    fmt: Literal[FORMATS] = "onnx",
    int8: bool = False,
    data: str | None = None,
    calib_batches: int = 10,
    register: str | None = None,
) -> dict:
    """Export a model to ONNX or OpenVINO (fp32 or int8) or TorchScript, checked against it, into the folder `out`
    (a cnnlab model); returns its cnnlab.json.

    Args:
        uri: models:/NAME@ALIAS, models:/NAME/V, a run id or runs:/RUN_ID, a logged-model id (m-...), or a .ckpt
        out: the folder to write
        fmt: the format
        int8: static int8 quantization (ONNX Runtime QOperator; OpenVINO: NNCF)
        data: labelled images (ImageFolder, CSV, shards): int8 calibrates on its training split and parity is
            checked on its test split (for int8, the data the model records by default)
        calib_batches: training batches (of 32) to calibrate on
        register: register the export as a new version of this name
    """
    if int8 and fmt == "torchscript":
        raise UserError("--int8 quantizes ONNX and OpenVINO models: use it with --format onnx or openvino.")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not (target / "MLmodel").exists():
        raise UserError(f"--out {out} is a folder with other files in it: choose a new or empty folder.")
    source = load.model(uri, program=True)
    if source.runtime != "torch":
        raise UserError(
            f"'{uri}' is already exported (format {source.meta.get('format')}): export from the torch model it "
            f"came from ({source.meta.get('source', {}).get('uri', 'its source')})."
        )
    size = source.image_size
    datamodule = None
    if data or int8:  # labelled images: int8 calibrates on the training split; parity runs on the test split
        from cnnlab.data import labelled

        datamodule, split = labelled(source.meta, data)
    with tempfile.TemporaryDirectory(prefix="cnnlab-export-") as tmp:
        folder = Path(tmp) / "network"
        train = datamodule.splits["train"] if int8 else None
        meta = convert(source, folder, fmt, int8, train, calib_batches)
        form = meta["format"]
        exported = load_network(folder)
        images, labels = [raw for raw, _ in source.samples], [label for _, label in source.samples]
        checked_on = f"{len(images)} sample images"
        if datamodule is not None:
            held_out = datamodule.splits[split]
            images = [held_out.raw(i, size) for i in range(len(held_out))]
            labels, checked_on = list(held_out.labels), f"{len(images)} {split} images of {datamodule.source}"
        meta.update(checks=parity(source, exported, images, labels), checks_on=checked_on)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        meta["sha256"] = save_model(target, folder, meta)  # the export's digest, for its tags
    checks = meta["checks"]
    print(
        f"exported {uri} -> {target} ({form}, {meta['bytes'] / 1e6:.1f} MB)\n"
        f"parity on {checked_on}: max |logit diff| {checks['max_abs_diff']:.2e}, top-1 agreement "
        f"{checks['top1_agreement']:.4f}; top-1 {checks['acc']:.4f} (source {checks['source_acc']:.4f})"
    )
    meta["run_id"], meta["version"] = _track(target, meta, register)
    return meta


def _track(folder: Path, meta: dict, register: str | None) -> tuple[str, str | None]:
    """An MLflow run holding the exported model and its checks; with --register, a new version of NAME."""
    source = meta["source"]
    tags = {"cnnlab.role": "export", "cnnlab.export.source": source["uri"], "cnnlab.export.format": meta["format"]}
    with store.run(f"export-{meta['format']}", tags) as run:
        return run.id, _log(run.client, run.id, folder, meta, register)


def _log(client, run_id: str, folder: Path, meta: dict, register: str | None) -> str | None:
    """The export's checks and model on its run; with --register, the version it became."""
    from cnnlab.registry import register_model

    source = meta["source"]
    for key, value in meta["checks"].items():
        client.log_metric(run_id, f"export/{key}", value)
    client.log_metric(run_id, "test/acc", meta["checks"]["acc"])
    model_tags = {
        "cnnlab.runtime": meta["runtime"],
        "cnnlab.format": meta["format"],
        "cnnlab.sha256": meta["sha256"],
        "cnnlab.source": source["uri"],
        "cnnlab.source_sha256": source["sha256"] or "",
        **({"cnnlab.source_version": f"{source['name']}/{source['version']}"} if source["version"] else {}),
        **({"cnnlab.parent_run": meta["run_id"]} if meta.get("run_id") else {}),
    }
    model_uri = store.log_model(client, run_id, folder, tags=model_tags)
    version = None
    if register:
        checks = meta["checks"]
        created = register_model(
            client,
            register,
            model_uri,
            run_id,
            {
                **model_tags,
                "variant": meta["format"],
                "test/acc": f"{checks['acc']:.6g}",
                "export/top1_agreement": f"{checks['top1_agreement']:.6g}",
                "export/max_abs_diff": f"{checks['max_abs_diff']:.3g}",
                "export/checked_on": meta["checks_on"],
            },
            f"{meta['format']} export of {source['uri']} (sha256 {source['sha256'][:12]}); parity on "
            f"{meta['checks_on']}: top-1 agreement {checks['top1_agreement']:.4f}.",
        )
        version = str(created.version)
        print(f"registered {register} v{version} ({meta['format']}, alias challenger)")
    return version
