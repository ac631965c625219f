"""`cnnlab serve MODEL_URI`: a LitServe prediction service with dynamic batching, hot alias swap and
hardened inputs.

    POST /predict   an image as raw bytes (Content-Type image/*), as multipart file(s), or JSON
                    {"images": [base64, ...]} for a batch; ?top_k=N. Answers the top-k labels with probabilities.
    GET  /health    200 once the workers are ready.
    GET  /info      model name, version, alias, classes, input size, backend, and per-worker counters.
    GET  /docs, /openapi.json

Bodies reach the workers as JSON (the middleware turns raw and multipart images into base64), where each
request is decoded and center-cropped, then concurrent requests are stacked into one model call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import signal
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import litserve as ls
import numpy as np
from fastapi import HTTPException

from cnnlab import UserError
from cnnlab.cnnlab_model import read_image, softmax

ERROR_KEY = "cnnlab_error"  # a worker's per-request error, answered by the Gate with its own status
ERRORS = {
    400: "bad request",
    401: "unauthorized",
    408: "body too slow",
    413: "too large",
    415: "unsupported media type",
    503: "busy: too many bytes in flight",
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {  # LitServe registers /predict without a body schema; this describes what it takes
    "summary": "Classify images: raw bytes, multipart files or JSON base64",
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}],
    "requestBody": {
        "required": True,
        "content": {
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY["schema"]}}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                        "top_k": {"type": "integer"},
                    },
                }
            },
        },
    },
    "responses": {
        "200": {"description": "top-k labels and probabilities per image"},
        **{str(k): {"description": v} for k, v in ERRORS.items()},
    },
}


def _json_error(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"detail": message}).encode()  # FastAPI's shape, as the workers' errors
    return (
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        },
        body,
    )


class Gate:
    """ASGI middleware in front of LitServe: the API key, the limits (body size, bytes in flight, images per
    request, slow bodies), every body shape turned into JSON for the workers, and every malformed request
    answered with a 4xx JSON error."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body_bytes: int,
        max_inflight_bytes: int,
        max_images: int,
        body_timeout: float,
    ):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.max_inflight_bytes, self.max_images, self.body_timeout = max_inflight_bytes, max_images, body_timeout
        self.inflight = 0  # bytes of request bodies held right now (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # latin-1 decodes any byte: a header that is not UTF-8 must not fail a request, /health included
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/health":
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode("latin-1"), self.api_key.encode()):  # constant time
                return await self._reply(send, 401, "missing or wrong API key: send it as X-API-Key or a Bearer token")
        if scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "0")
        if not declared.isascii() or not declared.isdigit() or len(declared) > 15:
            return await self._reply(send, 400, "Content-Length is not a number")
        if int(declared) > self.max_body_bytes:
            return await self._reply(send, 413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
        held = 0
        try:
            chunks = []
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    return await self._reply(send, 408, f"the body did not arrive within {self.body_timeout:g} s")
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                if held + len(chunk) > self.max_body_bytes:
                    return await self._reply(send, 413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
                if self.inflight + len(chunk) > self.max_inflight_bytes:
                    return await self._reply(
                        send, 503, "busy: too many bytes in flight (--max-inflight-bytes); retry shortly"
                    )
                chunks.append(chunk)
                held += len(chunk)
                self.inflight += len(chunk)
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            if not body:
                return await self._reply(
                    send, 400, 'empty body: send an image (image/*), a multipart file or JSON {"images": [base64, ...]}'
                )
            try:
                payload = await self._payload(headers.get("content-type", ""), body, scope)
                query = _query_top_k(scope)
                payload["top_k"] = query if query is not None else _top_k(payload.get("top_k"))
            except LookupError as err:
                return await self._reply(send, 415, str(err))
            except ValueError as err:
                return await self._reply(send, 400, str(err))
            if len(payload["images"]) > self.max_images:
                return await self._reply(
                    send,
                    413,
                    f"{len(payload['images'])} images in one request; at most {self.max_images} (--max-images)",
                )
            data = json.dumps(payload).encode()
            scope = {
                **scope,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                + [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")],
            }
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}

            return await self.app(scope, replay, self._error_status(send))
        finally:
            self.inflight -= held

    @staticmethod
    def _error_status(send):
        """Wrap `send`: a worker's per-request error item goes out as a JSON error with its own 4xx status."""
        held = {}

        async def wrapped(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                held["start"] = message
                return
            if message["type"] == "http.response.body" and "start" in held:
                body = held.setdefault("body", b"") + message.get("body", b"")
                if message.get("more_body"):
                    held["body"] = body
                    return
                start = held.pop("start")
                if body.startswith(b'{"' + ERROR_KEY.encode()):
                    error = json.loads(body)[ERROR_KEY]
                    start, body = _json_error(int(error["status"]), str(error["detail"]))
                else:
                    start = {
                        **start,
                        "headers": [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                        + [(b"content-length", str(len(body)).encode())],
                    }
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        return wrapped

    @staticmethod
    async def _payload(content_type: str, body: bytes, scope) -> dict:
        """{"images": [base64, ...], "top_k": ...} from a raw image, a multipart form or JSON; ValueError (400)
        or LookupError (415) for anything else."""
        kind, _, params = content_type.partition(";")
        kind = kind.strip().lower()
        if kind.startswith("image/") or kind == "application/octet-stream":
            return {"images": [base64.b64encode(body).decode()]}
        if kind == "multipart/form-data":
            return {"images": [base64.b64encode(f).decode() for f in await _multipart_files(params, body, scope)]}
        if kind == "application/json":
            try:
                payload = json.loads(body, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise ValueError("the JSON body does not parse (or nests too deep, or holds NaN/Infinity)") from None
            images = (
                payload.get("images", [payload["image"]] if "image" in payload else None)
                if isinstance(payload, dict)
                else None
            )
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise ValueError('JSON bodies are {"images": [base64, ...]} (or {"image": base64})')
            return {"images": images, "top_k": payload.get("top_k")}
        raise LookupError(
            f"Content-Type '{kind or 'none'}' is not accepted: send image/*, multipart/form-data or application/json"
        )

    @staticmethod
    async def _reply(send, status: int, message: str):
        start, body = _json_error(status, message)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


MAX_TOP_K = 1000


def _top_k(value) -> int | None:
    """top_k as given (JSON or the query string): a whole number from 1 to MAX_TOP_K, or absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 4:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise ValueError(f"top_k must be a whole number from 1 to {MAX_TOP_K}")
    return value


def _query_top_k(scope) -> int | None:
    from urllib.parse import parse_qs

    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("top_k")
    return _top_k(values[0]) if values else None


async def _multipart_files(params: str, body: bytes, scope) -> list[bytes]:
    """The file fields of a complete multipart body (a missing boundary or a truncated body: ValueError)."""
    from starlette.requests import Request

    boundary = next(
        (p.split("=", 1)[1].strip().strip('"') for p in params.split(";") if p.strip().lower().startswith("boundary=")),
        "",
    )
    if not boundary:
        raise ValueError("multipart body without a boundary in its Content-Type")
    if f"--{boundary}--".encode("latin-1", "replace") not in body[-len(boundary) - 8 :]:
        raise ValueError("the multipart body is truncated or its boundary does not match the Content-Type's")

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form()
        files = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
    except Exception as err:  # python-multipart's own errors: a malformed body is the client's
        raise ValueError(f"the multipart body does not parse ({str(err).splitlines()[0][:120]})") from None
    if not files:
        raise ValueError("the multipart body holds no file: send the image as a file field")
    return files


class ImageClassifierAPI(ls.LitAPI):
    """One worker: decode and crop each request, stack concurrent ones, run the model, answer top-k."""

    def __init__(
        self,
        uri: str,
        max_pixels: int,
        max_decode_seconds: float,
        follow_alias: float,
        state_dir: str,
        threads: int,
        max_batch_size: int,
        batch_timeout: float,
        runtime: str | None = None,
        device: str = "cpu",
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.uri, self.max_pixels, self.max_decode_seconds = uri, max_pixels, max_decode_seconds
        self.runtime, self.requested_device = runtime, device
        self.follow_alias, self.state_dir, self.threads = follow_alias, state_dir, threads

    def setup(self, device):
        import torch

        torch.set_num_threads(self.threads)
        # LitServe's device for a torch model on a GPU; otherwise the asked-for one (ONNX Runtime's providers)
        self.device = str(device) if str(device).startswith("cuda") else self.requested_device
        self.stats = {"requests": 0, "images": 0, "model_calls": 0}
        self.current = self._load(self.uri)
        if self.follow_alias and "@" in self.uri:
            threading.Thread(target=self._follow, daemon=True).start()

    def _load(self, uri: str):
        """The registered artifact itself, on its own runtime: what the promotion gate evaluated."""
        from cnnlab import store

        loaded = store.load(uri, self.threads, self.device, self.runtime)
        if uri != self.uri:  # a pinned version loaded for the alias: keep the alias's name
            loaded.alias, loaded.source = self.uri.partition("@")[2], self.uri
        self._write_state(loaded)
        return loaded

    def _follow(self):
        """Poll the registry; load a moved alias's version beside the old one, then swap in one step."""
        while True:
            time.sleep(self.follow_alias)
            try:
                from cnnlab import store

                ref = store.resolve(self.uri)
                if ref.version != self.current.version:
                    self.current = self._load(f"models:/{ref.name}/{ref.version}")
            except Exception as err:  # a registry hiccup must not stop the poller
                print(f"cnnlab serve: alias poll failed ({err}); keeping v{self.current.version}", flush=True)

    def _write_state(self, loaded) -> None:
        state = {
            "pid": os.getpid(),
            "name": loaded.name,
            "version": loaded.version,
            "alias": loaded.alias,
            "uri": self.uri,
            "runtime": loaded.runtime,
            "engine": loaded.engine,
            "sha256": loaded.digest,
            "device": self.device,
            **self.stats,
        }
        path = Path(self.state_dir) / f"worker-{os.getpid()}.json"
        # a file per thread: the alias poller and the request path both write, and the rename must find its own
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)

    def decode_request(self, request):
        """One request's images, each decoded and checked on its own; a bad request becomes its own 4xx answer
        (an error item), never an exception: LitServe fails every request of a batch on one exception. The
        request's pixels together stay within --max-pixels, and its decoding within --max-decode-seconds."""
        budget = {"pixels": self.max_pixels, "deadline": time.monotonic() + self.max_decode_seconds}
        try:
            return {
                "arrays": np.stack([self._image(i, text, budget) for i, text in enumerate(request["images"])]),
                "top_k": max(1, min(int(request.get("top_k") or 5), len(self.current.classes))),
            }
        except HTTPException as err:
            return {"error": err.status_code, "detail": err.detail}

    def _image(self, index: int, text: str, budget: dict) -> np.ndarray:
        if time.monotonic() > budget["deadline"]:
            raise HTTPException(
                413,
                f"image {index}: decoding this request took over {self.max_decode_seconds:g} s "
                "(--max-decode-seconds); send fewer or smaller images",
            )
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"image {index}: not valid base64") from None
        if not raw:
            raise HTTPException(400, f"image {index}: empty")
        try:  # the pixel limit is checked on the header, before the pixels are decoded
            array, _ = read_image(raw, max_pixels=max(1, budget["pixels"]))
        except OverflowError as err:
            raise HTTPException(
                413,
                f"image {index}: {err} (what is left of --max-pixels {self.max_pixels} for all its images together)",
            ) from None
        except Exception as err:
            raise HTTPException(
                415 if "cannot identify" in str(err) else 400,
                f"image {index}: not a readable image ({str(err).splitlines()[0][:200]})",
            ) from None
        budget["pixels"] -= array.shape[0] * array.shape[1]
        return self.current.preprocess(array)

    def batch(self, inputs):
        good = [i["arrays"] for i in inputs if "arrays" in i]
        return {"inputs": inputs, "arrays": np.concatenate(good) if good else None}

    def unbatch(self, output):
        out, start = [], 0
        for item in output["inputs"]:
            if "error" in item:
                out.append(item)
                continue
            count = len(item["arrays"])
            out.append(
                {"probs": output["probs"][start : start + count], "top_k": item["top_k"], "model": output["model"]}
            )
            start += count
        return out

    def predict(self, x):
        single = "inputs" not in x
        batch = self.batch([x]) if single else x
        current = self.current  # in-flight requests finish on the model they started with
        probs = None
        if batch["arrays"] is not None:
            probs = softmax(current.predict(np.ascontiguousarray(batch["arrays"].transpose(0, 3, 1, 2))))
            self.stats["model_calls"] += 1
            self.stats["images"] += len(probs)
        self.stats["requests"] += len(batch["inputs"])
        self._write_state(current)
        output = {
            **batch,
            "probs": probs,
            "model": {"name": current.name, "version": current.version, "classes": current.classes},
        }
        return self.unbatch(output)[0] if single else output

    def encode_response(self, output):
        if "error" in output:  # the Gate turns this into the request's own status
            return {ERROR_KEY: {"status": output["error"], "detail": output["detail"]}}
        classes = output["model"]["classes"]
        predictions = []
        for row in output["probs"]:
            order = np.argsort(-row)[: output["top_k"]]
            predictions.append(
                {
                    "label": classes[order[0]],
                    "probability": float(row[order[0]]),
                    "top_k": [{"label": classes[i], "probability": float(row[i])} for i in order],
                }
            )
        return {
            "predictions": predictions,
            "model": {"name": output["model"]["name"], "version": output["model"]["version"]},
        }


async def info(state_dir: str, static: dict):
    """GET /info: the static description plus what each worker has loaded and served."""
    from fastapi.responses import JSONResponse

    workers = []
    for path in sorted(Path(state_dir).glob("worker-*.json")):
        try:
            workers.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    current = max(workers, key=lambda w: int(w["version"] or 0), default={})
    return JSONResponse(
        {
            **static,
            "name": current.get("name"),
            "version": current.get("version"),
            "alias": current.get("alias"),
            "sha256": current.get("sha256"),
            "workers": workers,
            "model_calls": sum(w["model_calls"] for w in workers),
            "requests": sum(w["requests"] for w in workers),
        }
    )


def serve(
    uri: str,
    device: str = "cpu",
    max_batch_size: int = 32,
    batch_timeout_ms: float = 5,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    follow_alias: bool = False,
    poll_seconds: float = 5.0,
    api_key_env: str | None = None,
    max_body_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
    threads: int | None = None,
    max_images: int = 64,
    max_inflight_bytes: int = 200_000_000,
    max_decode_seconds: float = 5.0,
    body_timeout: float = 30.0,
    idle_timeout: float = 5.0,
    runtime: str | None = None,
) -> int:
    """Serve the model a URI names, on the runtime its artifact holds (torch program, ONNX, TorchScript,
    OpenVINO), or an ONNX one on `runtime` (openvino)."""
    from cnnlab import store
    from cnnlab.cnnlab_model import RUNTIMES

    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: choose cpu or cuda (cuda:N for one GPU).")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty. Export the key in it.")
    if follow_alias and "@" not in uri:
        raise UserError(f"--follow-alias needs a models:/NAME@ALIAS URI, got {uri}.")
    if runtime is not None and runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: choose {' or '.join(RUNTIMES)} (default: the artifact's own).")
    network = store.load(uri, 1, "cpu", runtime)  # a bad URI or runtime fails here, not in a worker
    accelerator = "cpu"
    # ONNX Runtime needs no torch GPU: the workers ask for its CUDA / TensorRT providers (or say in one line why not)
    if device.startswith("cuda") and network.engine != "onnxruntime":
        import torch

        if network.engine == "openvino":
            raise UserError(f"--device {device}: OpenVINO runs on the CPU here; serve the ONNX model for CUDA.")
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device}: torch {torch.__version__} sees no CUDA GPU here. Serve on --device cpu."
            )
        accelerator = "cuda"
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    state_dir = tempfile.mkdtemp(prefix="cnnlab-serve-")
    api = ImageClassifierAPI(
        uri,
        max_pixels,
        max_decode_seconds,
        poll_seconds if follow_alias else 0,
        state_dir,
        threads,
        max_batch_size,
        batch_timeout_ms / 1000,
        runtime,
        device,
    )
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        info_path="/server-info",
        timeout=60,
        middlewares=[
            (
                Gate,
                {
                    "api_key": api_key,
                    "max_body_bytes": max_body_bytes,
                    "max_inflight_bytes": max_inflight_bytes,
                    "max_images": max_images,
                    "body_timeout": body_timeout,
                },
            )
        ],
    )
    static = {
        "uri": uri,
        "classes": network.classes,
        "input_size": network.image_size,
        "crop_pct": network.meta["crop_pct"],
        "runtime": network.runtime,
        "engine": network.engine,
        "format": network.meta.get("format"),
        "device": device,
        "params": network.params,
        "max_batch_size": max_batch_size,
        "batch_timeout_ms": batch_timeout_ms,
    }
    server.app.add_api_route("/info", partial(info, state_dir, static), methods=["GET"])
    for route in server.app.routes:
        if getattr(route, "path", None) == "/predict":
            route.openapi_extra = PREDICT_OPENAPI

    def stop(signum, frame):  # LitServe shuts its workers down cleanly on KeyboardInterrupt, not on SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(
        f"cnnlab serve: {uri} ({network.engine} on {device}, sha256 {network.digest[:12]}) at "
        f"http://{host}:{port}/predict",
        flush=True,
    )
    server.run(host=host, port=port, generate_client_file=False, log_level="warning", timeout_keep_alive=idle_timeout)
    return 0
