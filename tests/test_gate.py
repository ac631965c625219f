"""The request gate alone, as ASGI middleware in front of a recording app: auth, limits, body shapes, 4xx answers
(the served behaviour is tested end to end in test_serve.py)."""

import asyncio
import base64
import json

import pytest

from cnnlab.gate import ERROR_KEY, Gate


class App:
    """Records the body the gate passes on; answers what a worker would (a result, or an error item)."""

    def __init__(self, answer: dict):
        self.answer, self.bodies = answer, []

    async def __call__(self, scope, receive, send):
        self.bodies.append(json.loads((await receive())["body"]))
        body = json.dumps(self.answer).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"999")]})
        await send({"type": "http.response.body", "body": body})


def call(body: bytes, content_type: str = "image/png", path: str = "/predict", key: str | None = "k", **limits):
    app = App(limits.pop("answer", {"predictions": []}))
    settings = {"api_key": "k", "max_body_bytes": 100, "max_inflight_bytes": 1000, "max_images": 2, "body_timeout": 1}
    gate, sent = Gate(app, **{**settings, **limits}), []
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(b"x-api-key", key.encode())] if key else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:])), app.bodies


def test_a_raw_image_reaches_the_workers_as_json_base64():
    status, answer, bodies = call(b"PNGBYTES")
    assert status == 200 and answer == {"predictions": []}
    assert bodies == [{"images": [base64.b64encode(b"PNGBYTES").decode()], "top_k": None, "min_confidence": None}]


def test_a_json_request_may_ask_its_own_min_confidence():
    status, _, bodies = call(b'{"images": ["a"], "min_confidence": 0.75}', "application/json")
    assert status == 200 and bodies[0]["min_confidence"] == 0.75


@pytest.mark.parametrize(
    "body, content_type, key, status, says",
    [
        (b"x", "image/png", None, 401, "API key"),
        (b"x" * 101, "image/png", "k", 413, "--max-body-bytes"),
        (b"", "image/png", "k", 400, "empty body"),
        (b"{not json", "application/json", "k", 400, "does not parse"),
        (b'{"images": ["a", "b", "c"]}', "application/json", "k", 413, "--max-images"),
        (b'{"images": ["a"], "top_k": 0}', "application/json", "k", 400, "top_k"),
        (b'{"images": ["a"], "min_confidence": 1.5}', "application/json", "k", 400, "min_confidence"),
        (b'{"images": ["a"], "min_confidence": "high"}', "application/json", "k", 400, "min_confidence"),
        (b"x", "text/plain", "k", 415, "not accepted"),
    ],
)
def test_a_bad_request_is_a_json_4xx_before_any_worker(body, content_type, key, status, says):
    got, answer, bodies = call(body, content_type, key=key)
    assert got == status and says in answer["detail"] and bodies == []


def test_a_workers_error_item_becomes_its_own_status():
    status, answer, _ = call(b"x", answer={ERROR_KEY: {"status": 415, "detail": "image 0: not a readable image"}})
    assert status == 415 and answer == {"detail": "image 0: not a readable image"}
