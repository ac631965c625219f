"""The serving protocols `cnnlab serve` speaks besides its own /predict: the Open Inference Protocol v2 (KServe,
Triton, Seldon: /v2/...) and MLflow's scoring protocol (/ping, /invocations). Each request is turned into the
workers' one JSON form ({"images": [base64, ...]} or {"pixels": base64, "shape": [N, H, W, 3]}), each answer into
the protocol's shape, each error into the protocol's error body; and the GET endpoints of all of them (probes,
model metadata, /info, /metrics), answered from what each worker wrote when it loaded its model.

Open Inference v2 (https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol): one input,
either encoded images (datatype BYTES: base64 strings in JSON, raw bytes with the binary-data extension) or a
UINT8 N x H x W x 3 batch of pixels; the outputs `probabilities` (FP32 N x classes), `label` (BYTES N, "" when
unsure) and `unsure` (BOOL N). Answers are always JSON (the binary-data extension lets a server answer so).
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

from cnnlab import metrics

OUTPUTS = ("probabilities", "label", "unsure")
V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
MLFLOW_CODES = {401: "UNAUTHENTICATED", 404: "RESOURCE_DOES_NOT_EXIST", 503: "TEMPORARILY_UNAVAILABLE"}
SERVER = {"name": "cnnlab", "extensions": ["binary_tensor_data"]}


def of(path: str) -> str:
    """Which protocol a path speaks: `v2`, `mlflow` or `cnnlab` (/predict and the rest)."""
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    return "mlflow" if path in ("/invocations", "/ping") else "cnnlab"


def error_body(protocol: str, status: int, message: str) -> bytes:
    """A 4xx/5xx answer's body in the protocol's shape."""
    if protocol == "v2":
        body = {"error": message}
    elif protocol == "mlflow":
        body = {"error_code": MLFLOW_CODES.get(status, "BAD_REQUEST"), "message": message}
    else:
        body = {"detail": message}  # FastAPI's shape, as the workers' errors
    return json.dumps(body).encode()


def v2_request(path: str, body: bytes, header_length: str | None) -> dict:
    """The workers' JSON form of an Open Inference v2 infer request (ValueError with the reason otherwise)."""
    binary = b""
    if header_length is not None:  # the binary-data extension: JSON, then the tensors' bytes
        if not header_length.isascii() or not header_length.isdigit() or int(header_length) > len(body):
            raise ValueError("Inference-Header-Content-Length is not a length within the body")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError):
        raise ValueError("the JSON body does not parse (or nests too deep, or holds NaN/Infinity)") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ValueError('an infer request has one input: {"inputs": [{"name", "shape", "datatype", "data"}]}')
    tensor = inputs[0]
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError("input shape must be a list of whole numbers")
    size = math.prod(shape)
    data = _tensor_bytes(tensor, binary)
    match = V2_INFER.match(path)
    payload = {"protocol": "v2", "model": match["name"], "version": match["version"], "id": request.get("id")}
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    payload["min_confidence"] = parameters.get("min_confidence")
    payload["outputs"] = _outputs(request.get("outputs"))
    if datatype == "BYTES":
        images = _bytes_elements(data) if isinstance(data, bytes) else _flat(data)
        if len(images) != size or not images:
            raise ValueError(f"input shape {shape} holds {size} images, the data {len(images)}")
        if isinstance(data, bytes):
            images = [base64.b64encode(i).decode() for i in images]
        elif not all(isinstance(i, str) for i in images):
            raise ValueError("BYTES data in JSON are base64 strings of encoded images")
        return {**payload, "images": images}
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] not in (1, 3) or not size:
            raise ValueError(f"UINT8 pixels are a batch N x H x W x 3 (or x 1), got shape {shape}")
        if not isinstance(data, bytes):
            values = _flat(data)
            if len(values) != size or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
                raise ValueError(f"input shape {shape} needs {size} whole numbers from 0 to 255 as data")
            data = bytes(values)
        elif len(data) != size:
            raise ValueError(f"input shape {shape} needs {size} bytes, the binary data holds {len(data)}")
        return {**payload, "pixels": base64.b64encode(data).decode(), "shape": shape}
    raise ValueError(f"input datatype {datatype!r}: send BYTES (encoded images) or UINT8 (N x H x W x 3 pixels)")


def _tensor_bytes(tensor: dict, binary: bytes):
    """The input's JSON data, or its bytes under the binary-data extension."""
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    if "binary_data_size" not in parameters:
        if "data" not in tensor:
            raise ValueError("the input has no data (and no binary_data_size)")
        return tensor["data"]
    size = parameters["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
        raise ValueError("binary_data_size is not a length within the body's binary part")
    return binary[:size]


def _bytes_elements(data: bytes) -> list[bytes]:
    """BYTES elements of the binary-data extension: each a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("BYTES binary data ends inside an element's length")
        length = int.from_bytes(data[at : at + 4], "little")
        if at + 4 + length > len(data):
            raise ValueError("BYTES binary data ends inside an element")
        out.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return out


def _flat(data) -> list:
    """A tensor's JSON data, flattened in row-major order (it may be nested or flat)."""
    if not isinstance(data, list):
        raise ValueError("tensor data must be a list")
    out, stack = [], [iter(data)]
    while stack:  # no recursion: a deeply nested body must not overflow the stack
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _outputs(requested) -> list[str]:
    if requested is None:
        return list(OUTPUTS)
    names = [o.get("name") for o in requested if isinstance(o, dict)] if isinstance(requested, list) else None
    if not names or len(names) != len(requested) or any(n not in OUTPUTS for n in names):
        raise ValueError(f"requested outputs must be named among {', '.join(OUTPUTS)}")
    return names


def v2_answer(predictions, classes: list[str], threshold: float, model: dict, request: dict) -> dict:
    """An infer response: probabilities, labels ("" when unsure) and unsure flags of N images."""
    top = predictions.argmax(1)
    unsure = [bool(row[i] < threshold) for row, i in zip(predictions, top)]
    tensors = {
        "probabilities": ("FP32", list(predictions.shape), predictions.ravel().tolist()),
        "label": ("BYTES", [len(top)], ["" if u else classes[i] for i, u in zip(top, unsure)]),
        "unsure": ("BOOL", [len(top)], unsure),
    }
    answer = {
        "model_name": model["name"],
        "model_version": model["version"],
        "outputs": [
            {"name": n, "datatype": tensors[n][0], "shape": tensors[n][1], "data": tensors[n][2]}
            for n in request["outputs"]
        ],
    }
    return {**answer, "id": request["id"]} if request.get("id") is not None else answer


def v2_metadata(name: str, version: str | None, classes: list[str], engine: str) -> dict:
    """GET /v2/models/{name}: the inputs a request may send and the outputs it gets."""
    return {
        "name": name,
        "versions": [version] if version else [],
        "platform": f"cnnlab_{engine}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "unsure", "datatype": "BOOL", "shape": [-1]},
        ],
        "parameters": {"classes": classes},
    }


def mlflow_request(body: bytes) -> dict:
    """The workers' JSON form of what a client of `mlflow models serve` sends for the pyfunc's signature (one
    binary `image` column, base64 in JSON), parsed by MLflow's own scoring parser (ValueError otherwise)."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    from cnnlab.cnnlab_model import signature

    try:
        request = json.loads(body, parse_constant=no_constant)
        if not isinstance(request, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise ValueError(
            'the body is not a JSON object: send {"dataframe_split": {"columns": ["image"], "data": [[base64]]}}, '
            '"dataframe_records", "inputs" or "instances", as for mlflow models serve'
        ) from None
    if "inputs" in request or "instances" in request:  # MLflow decodes base64 only in the DataFrame forms
        raise ValueError(
            "a binary image column is read from dataframe_split or dataframe_records (base64 strings); "
            "MLflow's scoring server does not decode base64 in 'inputs' or 'instances' either"
        )
    try:
        data = infer_and_parse_data(request, signature().inputs)
    except Exception as err:  # MLflow's own message names what is wrong with the body
        raise ValueError(str(getattr(err, "message", err)).splitlines()[0][:300] or "the body does not parse") from None
    if "image" not in getattr(data, "columns", ()):
        raise ValueError("the model's signature has one binary column, 'image': send it (base64 strings)")
    images = list(data["image"])
    if not images or not all(isinstance(i, bytes) for i in images):
        raise ValueError("the image column must hold base64 strings of encoded images")
    return {"protocol": "mlflow", "images": [base64.b64encode(i).decode() for i in images]}


def mlflow_answer(predictions, classes: list[str]) -> dict:
    """What `mlflow models serve` answers for the same pyfunc: its DataFrame as records."""
    top = predictions.argmax(1)
    return {
        "predictions": [
            {"label": classes[i], "score": float(row[i]), "probabilities": [float(p) for p in row]}
            for row, i in zip(predictions, top)
        ]
    }


def no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def states(state_dir: str) -> list[dict]:
    """What each worker has loaded (written at each load)."""
    out = []
    for path in sorted(Path(state_dir).glob("worker-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def add_routes(app, state_dir: str, counters, static: dict, workers: int) -> None:
    """A page to try the model (/) and /info for people; the probes and model metadata of Open Inference v2 and
    MLflow's /ping; /metrics."""
    from importlib.resources import files

    from fastapi import Response
    from fastapi.responses import HTMLResponse, JSONResponse

    def current() -> dict:
        return max(states(state_dir), key=lambda w: int(w["version"] or 0), default={})

    def info():
        loaded = [{**state, **counters.read(state["slot"])} for state in states(state_dir)]
        latest = current()
        return JSONResponse(
            {
                **static,
                **{k: latest.get(k) for k in ("name", "version", "alias", "sha256", "params", "min_confidence")},
                "workers": loaded,
                **{field: sum(w[field] for w in loaded) for field in counters.FIELDS},
            }
        )

    def ready(name: str | None = None, version: str | None = None):
        """200 once every worker has loaded the model (and it is the one asked for)."""
        loaded = states(state_dir)
        if name is not None:
            served = {(w["name"] or "model", w["version"]) for w in loaded}
            if not any(name == n and version in (None, v) for n, v in served):
                return _v2_error(404, f"model {name}{f' version {version}' if version else ''} is not served here")
        if len(loaded) < workers:
            return _v2_error(503, f"{len(loaded)} of {workers} workers have loaded the model")
        return Response(status_code=200)

    def metadata(name: str, version: str | None = None):
        loaded = [w for w in states(state_dir) if (w["name"] or "model") == name and version in (None, w["version"])]
        if not loaded:
            return _v2_error(404, f"model {name}{f' version {version}' if version else ''} is not served here")
        answer = v2_metadata(name, loaded[-1]["version"], static["classes"], static["engine"])
        answer["versions"] = sorted({w["version"] for w in loaded if w["version"]})
        return JSONResponse(answer)

    def exposition():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # a page to try the model: it calls /predict with the key typed into it, as any client does
    page = (files("cnnlab") / "presets" / "try.html").read_text()

    routes = {
        "/": lambda: HTMLResponse(page),
        "/info": info,
        "/v2": lambda: JSONResponse({**SERVER, "version": _version()}),
        "/v2/health/live": lambda: Response(status_code=200),
        "/v2/health/ready": ready,
        "/ping": lambda: Response("\n", status_code=200 if len(states(state_dir)) >= workers else 503),
        "/v2/models/{name}": metadata,
        "/v2/models/{name}/versions/{version}": metadata,
        "/v2/models/{name}/ready": ready,
        "/v2/models/{name}/versions/{version}/ready": ready,
        "/metrics": exposition,
    }
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in routes]  # LitServe's "/"
    for path, endpoint in routes.items():
        app.add_api_route(path, endpoint, methods=["GET"])


def _v2_error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _version() -> str:
    from importlib.metadata import version

    return version("cnnlab")
