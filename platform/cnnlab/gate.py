"""The request gate in front of `cnnlab serve`'s workers (ASGI middleware): the API key, the limits (body size,
bytes in flight, images per request, slow bodies), every accepted body shape of every protocol (/predict, Open
Inference v2, MLflow's /invocations) turned into one JSON form for the workers, every malformed request answered
with a 4xx JSON error in its protocol's shape, never a 5xx, and every request counted for /metrics."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from functools import partial

from cnnlab import metrics, protocols

ERROR_KEY = "cnnlab_error"  # a worker's per-request error, answered by the Gate with its own status
OPEN = ("/", "/health", "/v2/health/live", "/v2/health/ready", "/ping")  # the page and the probes need no API key
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
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
        {
            "name": "min_confidence",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "minimum": 0, "maximum": 1},
        },
    ],
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
                        "min_confidence": {"type": "number"},
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


def _json_error(status: int, message: str, protocol: str = "cnnlab") -> tuple[dict, bytes]:
    body = protocols.error_body(protocol, status, message)
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
        counts, route, began = metrics.families(), metrics.endpoint(scope["path"]), time.perf_counter()
        answered = {"status": 499}  # a client that left before its answer

        async def counted(message):
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        counts.in_flight.inc()
        try:
            return await self._gate(scope, receive, counted)
        finally:
            counts.in_flight.dec()
            counts.requests.labels(route, str(answered["status"])).inc()
            counts.latency.labels(route).observe(time.perf_counter() - began)

    async def _gate(self, scope, receive, send):
        path, protocol = scope["path"], protocols.of(scope["path"])
        reply = partial(self._reply, send, protocol=protocol)
        # latin-1 decodes any byte: a header that is not UTF-8 must not fail a request, /health included
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and path not in OPEN:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode("latin-1"), self.api_key.encode()):  # constant time
                return await reply(401, "missing or wrong API key: send it as X-API-Key or a Bearer token")
        if scope["method"] != "POST" or not (path in ("/predict", "/invocations") or protocols.V2_INFER.match(path)):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "0")
        if not declared.isascii() or not declared.isdigit() or len(declared) > 15:
            return await reply(400, "Content-Length is not a number")
        if int(declared) > self.max_body_bytes:
            return await reply(413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
        held = 0
        try:
            chunks = []
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    return await reply(408, f"the body did not arrive within {self.body_timeout:g} s")
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                if held + len(chunk) > self.max_body_bytes:
                    return await reply(413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
                if self.inflight + len(chunk) > self.max_inflight_bytes:
                    return await reply(503, "busy: too many bytes in flight (--max-inflight-bytes); retry shortly")
                chunks.append(chunk)
                held += len(chunk)
                self._hold(len(chunk))
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            if not body:
                return await reply(
                    400, 'empty body: send an image (image/*), a multipart file or JSON {"images": [base64, ...]}'
                )
            try:
                if protocol == "v2":
                    payload = protocols.v2_request(path, body, headers.get("inference-header-content-length"))
                elif protocol == "mlflow":
                    payload = protocols.mlflow_request(body)
                else:
                    payload = await self._payload(headers.get("content-type", ""), body, scope)
                    query = _query(scope)
                    payload["top_k"] = _top_k(query.get("top_k", payload.get("top_k")))
                    payload["min_confidence"] = query.get("min_confidence", payload.get("min_confidence"))
                payload["min_confidence"] = _probability(payload.get("min_confidence"))
            except LookupError as err:
                return await reply(415, str(err))
            except ValueError as err:
                return await reply(400, str(err))
            count = payload["shape"][0] if "shape" in payload else len(payload["images"])
            if count > self.max_images:
                return await reply(413, f"{count} images in one request; at most {self.max_images} (--max-images)")
            data = json.dumps(payload).encode()
            scope = {
                **scope,
                "path": "/predict",  # every protocol reaches the same batching workers
                "raw_path": b"/predict",
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

            return await self.app(scope, replay, self._error_status(send, protocol))
        finally:
            self._hold(-held)

    def _hold(self, size: int) -> None:
        """Bytes of bodies held (one event loop: no lock needed), counted for /metrics too."""
        self.inflight += size
        metrics.families().in_flight_bytes.set(self.inflight)

    @staticmethod
    def _error_status(send, protocol: str):
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
                    start, body = _json_error(int(error["status"]), str(error["detail"]), protocol)
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
                payload = json.loads(body, parse_constant=protocols.no_constant)
            except (ValueError, RecursionError):
                raise ValueError("the JSON body does not parse (or nests too deep, or holds NaN/Infinity)") from None
            images = (
                payload.get("images", [payload["image"]] if "image" in payload else None)
                if isinstance(payload, dict)
                else None
            )
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise ValueError('JSON bodies are {"images": [base64, ...]} (or {"image": base64})')
            return {"images": images, "top_k": payload.get("top_k"), "min_confidence": payload.get("min_confidence")}
        raise LookupError(
            f"Content-Type '{kind or 'none'}' is not accepted: send image/*, multipart/form-data or application/json"
        )

    @staticmethod
    async def _reply(send, status: int, message: str, protocol: str = "cnnlab"):
        start, body = _json_error(status, message, protocol)
        await send(start)
        await send({"type": "http.response.body", "body": body})


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


def _probability(value) -> float | None:
    """min_confidence as given (JSON or the query string): a number from 0 to 1, or absent."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value) if len(value) <= 32 else None
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError("min_confidence must be a number from 0 to 1")
    return float(value)


def _query(scope) -> dict[str, str]:
    """The query string's first value of each parameter."""
    from urllib.parse import parse_qs

    return {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


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
