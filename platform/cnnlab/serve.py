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

import base64
import binascii
import hmac
import io
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

ERRORS = {400: "bad request", 401: "unauthorized", 413: "too large", 415: "unsupported media type"}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {  # LitServe registers /predict without a body schema; this describes what it takes
    "summary": "Classify images: raw bytes, multipart files or JSON base64",
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}],
    "requestBody": {"required": True, "content": {
        "image/*": _BINARY, "application/octet-stream": _BINARY,
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY["schema"]}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}}, "top_k": {"type": "integer"}}}}}},
    "responses": {"200": {"description": "top-k labels and probabilities per image"},
                  **{str(k): {"description": v} for k, v in ERRORS.items()}},
}


def _json_error(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"detail": message}).encode()  # FastAPI's shape, as the workers' errors
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            body)


class Gate:
    """ASGI middleware: the API key, the body limit, and every body shape turned into JSON for LitServe."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/health":
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):  # constant time: no timing leak
                return await self._reply(send, 401, "missing or wrong API key: send it as X-API-Key or a Bearer token")
        if scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if int(headers.get("content-length") or 0) > self.max_body_bytes:
            return await self._reply(send, 413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._reply(send, 413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
            if not message.get("more_body"):
                break
        if not body:
            return await self._reply(send, 400, "empty body: send an image (image/*), a multipart file or JSON "
                                                "{\"images\": [base64, ...]}")
        try:
            payload = await self._payload(headers.get("content-type", ""), body, scope)
        except ValueError as err:
            return await self._reply(send, 400, str(err))
        except LookupError as err:
            return await self._reply(send, 415, str(err))
        payload["top_k"] = _query_top_k(scope) or payload.get("top_k")
        data = json.dumps(payload).encode()
        scope = {**scope, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                 + [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _payload(content_type: str, body: bytes, scope) -> dict:
        kind = content_type.split(";")[0].strip().lower()
        if kind.startswith("image/") or kind == "application/octet-stream":
            return {"images": [base64.b64encode(body).decode()]}
        if kind == "multipart/form-data":
            from starlette.requests import Request

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(scope, receive).form()
            files = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise ValueError("the multipart body holds no file: send the image as a file field")
            return {"images": [base64.b64encode(f).decode() for f in files]}
        if kind == "application/json":
            try:
                payload = json.loads(body)
            except ValueError:
                raise ValueError("the JSON body does not parse") from None
            images = payload.get("images", [payload["image"]] if "image" in payload else None) \
                if isinstance(payload, dict) else None
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise ValueError("JSON bodies are {\"images\": [base64, ...]} (or {\"image\": base64})")
            return {"images": images, "top_k": payload.get("top_k")}
        raise LookupError(f"Content-Type '{kind or 'none'}' is not accepted: send image/*, multipart/form-data "
                          "or application/json")

    @staticmethod
    async def _reply(send, status: int, message: str):
        start, body = _json_error(status, message)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _query_top_k(scope) -> int | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode()).get("top_k")
    return int(values[0]) if values and values[0].isdigit() else None


class ImageClassifierAPI(ls.LitAPI):
    """One worker: decode and crop each request, stack concurrent ones, run the model, answer top-k."""

    def __init__(self, uri: str, max_pixels: int, follow_alias: float, state_dir: str, threads: int,
                 max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.uri, self.max_pixels = uri, max_pixels
        self.follow_alias, self.state_dir, self.threads = follow_alias, state_dir, threads

    def setup(self, device):
        import torch

        torch.set_num_threads(self.threads)
        self.device = "cuda" if str(device).startswith("cuda") else "cpu"
        self.stats = {"requests": 0, "images": 0, "model_calls": 0}
        self.current = self._load(self.uri)
        if self.follow_alias and "@" in self.uri:
            threading.Thread(target=self._follow, daemon=True).start()

    def _load(self, uri: str):
        """The registered artifact itself, on its own runtime: what the promotion gate evaluated."""
        from cnnlab import store

        loaded = store.load(uri, self.threads, self.device)
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
        state = {"pid": os.getpid(), "name": loaded.name, "version": loaded.version, "alias": loaded.alias,
                 "uri": self.uri, "runtime": loaded.runtime, "sha256": loaded.digest, "device": self.device,
                 **self.stats}
        path = Path(self.state_dir) / f"worker-{os.getpid()}.json"
        path.with_suffix(".tmp").write_text(json.dumps(state))
        path.with_suffix(".tmp").replace(path)

    def decode_request(self, request):
        from PIL import Image

        network = self.current
        arrays = []
        for index, text in enumerate(request["images"]):
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"image {index}: not valid base64") from None
            if not raw:
                raise HTTPException(400, f"image {index}: empty")
            try:
                with Image.open(io.BytesIO(raw)) as probe:
                    width, height = probe.size
                if width * height > self.max_pixels:
                    raise HTTPException(413, f"image {index}: {width}x{height} is over --max-pixels {self.max_pixels}")
                arrays.append(network.preprocess(raw))
            except HTTPException:
                raise
            except Exception as err:
                raise HTTPException(415 if "cannot identify" in str(err) else 400,
                                    f"image {index}: not a readable image ({str(err).splitlines()[0][:200]})") from None
        top_k = request.get("top_k") or 5
        return {"arrays": np.stack(arrays), "top_k": max(1, min(int(top_k), len(network.classes)))}

    def batch(self, inputs):
        return {"arrays": np.concatenate([i["arrays"] for i in inputs]), "counts": [len(i["arrays"]) for i in inputs],
                "top_k": [i["top_k"] for i in inputs]}

    def unbatch(self, output):
        out, start = [], 0
        for count, top_k in zip(output["counts"], output["top_k"]):
            out.append({"probs": output["probs"][start:start + count], "top_k": top_k, "model": output["model"]})
            start += count
        return out

    def predict(self, x):
        single = "counts" not in x
        batch = self.batch([x]) if single else x
        current = self.current  # in-flight requests finish on the model they started with
        logits = current.predict(np.ascontiguousarray(batch["arrays"].transpose(0, 3, 1, 2)))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        self.stats["model_calls"] += 1
        self.stats["requests"] += len(batch["counts"])
        self.stats["images"] += len(probs)
        self._write_state(current)
        output = {**batch, "probs": probs, "model": {"name": current.name, "version": current.version,
                                                      "classes": current.classes}}
        return self.unbatch(output)[0] if single else output

    def encode_response(self, output):
        classes = output["model"]["classes"]
        predictions = []
        for row in output["probs"]:
            order = np.argsort(-row)[:output["top_k"]]
            predictions.append({"label": classes[order[0]], "probability": float(row[order[0]]),
                                "top_k": [{"label": classes[i], "probability": float(row[i])} for i in order]})
        return {"predictions": predictions, "model": {"name": output["model"]["name"],
                                                      "version": output["model"]["version"]}}


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
    return JSONResponse({**static, "name": current.get("name"), "version": current.get("version"),
                         "alias": current.get("alias"), "sha256": current.get("sha256"), "workers": workers,
                         "model_calls": sum(w["model_calls"] for w in workers),
                         "requests": sum(w["requests"] for w in workers)})



def serve(uri: str, device: str = "cpu", max_batch_size: int = 32, batch_timeout_ms: float = 5, workers: int = 1,
          host: str = "127.0.0.1", port: int = 8000, follow_alias: bool = False, poll_seconds: float = 5.0,
          api_key_env: str | None = None, max_body_bytes: int = 10_000_000, max_pixels: int = 40_000_000,
          threads: int | None = None) -> int:
    """Serve the model a URI names, on the runtime its artifact holds (torch program, ONNX, TorchScript)."""
    from cnnlab import store

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty. Export the key in it.")
    if follow_alias and "@" not in uri:
        raise UserError(f"--follow-alias needs a models:/NAME@ALIAS URI, got {uri}.")
    network = store.load(uri, 1)  # a bad URI fails here, not in a worker
    if device != "cpu" and network.runtime == "onnx":
        raise UserError(f"--device {device}: '{uri}' is an ONNX model, which runs on the CPU here (onnxruntime's "
                        "CPU build). Serve its torch source on a GPU.")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    state_dir = tempfile.mkdtemp(prefix="cnnlab-serve-")
    api = ImageClassifierAPI(uri, max_pixels, poll_seconds if follow_alias else 0, state_dir, threads,
                             max_batch_size, batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cuda" if device == "cuda" else "cpu", devices=1,
                          workers_per_device=workers, info_path="/server-info", timeout=60,
                          middlewares=[(Gate, {"api_key": api_key, "max_body_bytes": max_body_bytes})])
    static = {"uri": uri, "classes": network.classes, "input_size": network.image_size,
              "crop_pct": network.meta["crop_pct"], "runtime": network.runtime, "format": network.meta.get("format"),
              "device": device, "params": network.params, "max_batch_size": max_batch_size,
              "batch_timeout_ms": batch_timeout_ms}
    server.app.add_api_route("/info", partial(info, state_dir, static), methods=["GET"])
    for route in server.app.routes:
        if getattr(route, "path", None) == "/predict":
            route.openapi_extra = PREDICT_OPENAPI

    def stop(signum, frame):  # LitServe shuts its workers down cleanly on KeyboardInterrupt, not on SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"cnnlab serve: {uri} ({network.runtime} on {device}, sha256 {network.digest[:12]}) at "
          f"http://{host}:{port}/predict", flush=True)
    server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    return 0
