"""The serving protocols clients already speak, with their own clients: Open Inference v2 through tritonclient,
MLflow's scoring protocol against `mlflow models serve` itself, Prometheus metrics through prometheus_client's
parser; the translation itself is unit-tested without a server."""

import base64
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cnnlab import metrics, protocols
from cnnlab.data import DataModule
from conftest import STORE_VARIABLES, mutated, serving

KEY = "protocol-test-key"
AUTH = {"X-API-Key": KEY}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def v2_body(images: list[bytes]) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": list(map(b64, images))}]}


# --- the translation, without a server ---------------------------------------------------------------------------


def test_a_v2_request_in_json_and_in_the_binary_extension_gives_the_same_images():
    images = [b"\x89PNG one", b"\x00\xfftwo"]
    assert protocols.v2_request("/v2/models/m/infer", json.dumps(v2_body(images)).encode(), None)["images"] == list(
        map(b64, images)
    )
    tensor = b"".join(len(i).to_bytes(4, "little") + i for i in images)
    header = json.dumps(
        {
            "id": "7",
            "inputs": [
                {"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(tensor)}}
            ],
            "outputs": [{"name": "label"}],
        }
    ).encode()
    payload = protocols.v2_request("/v2/models/m/versions/3/infer", header + tensor, str(len(header)))
    assert payload["images"] == list(map(b64, images))
    assert (payload["model"], payload["version"], payload["id"], payload["outputs"]) == ("m", "3", "7", ["label"])


def test_a_v2_pixel_batch_keeps_its_shape_and_bytes():
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    body = {"inputs": [{"name": "pixels", "shape": [2, 3, 4, 3], "datatype": "UINT8", "data": pixels.tolist()}]}
    payload = protocols.v2_request("/v2/models/m/infer", json.dumps(body).encode(), None)
    assert payload["shape"] == [2, 3, 4, 3]
    assert np.array_equal(np.frombuffer(base64.b64decode(payload["pixels"]), np.uint8).reshape(2, 3, 4, 3), pixels)


BINARY = '{"inputs": [{"shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": %d}}]}'


@pytest.mark.parametrize(
    "body, binary, reason",
    [
        ("{", None, "does not parse"),
        ('{"inputs": []}', None, "one input"),
        ('{"inputs": [{"shape": [2], "datatype": "BYTES", "data": ["aa"]}]}', None, "holds 2 images"),
        ('{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1.0]}]}', None, "datatype"),
        ('{"inputs": [{"shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 300]}]}', None, "0 to 255"),
        ('{"inputs": [{"shape": [-1], "datatype": "BYTES", "data": ["aa"]}]}', None, "whole numbers"),
        ('{"inputs": [{"shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": [{"name": "x"}]}', None, "among"),
        (BINARY % 9, b"\x01\x00", "within the body"),
        (BINARY % 3, b"\x05\x00\x00", "ends"),
        (BINARY % 6, b"\x05\x00\x00\x00ab", "ends inside an element"),
    ],
)
def test_a_malformed_v2_request_is_refused_with_its_reason(body, binary, reason):
    header = str(len(body)) if binary is not None else None
    with pytest.raises(ValueError, match=reason):
        protocols.v2_request("/v2/models/m/infer", body.encode() + (binary or b""), header)


def test_an_mlflow_request_is_read_as_mlflow_reads_it():
    images = [b"\x89PNG one", b"two"]
    split = {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}
    records = {"dataframe_records": [{"image": b64(i)} for i in images]}
    for body in (split, records):
        assert protocols.mlflow_request(json.dumps(body).encode())["images"] == list(map(b64, images))
    for body, reason in [
        (b"[1]", "not a JSON object"),
        (b'{"inputs": {"image": ["aa"]}}', "dataframe_split or dataframe_records"),
        (b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}', "'image'"),
    ]:
        with pytest.raises(ValueError, match=reason):
            protocols.mlflow_request(body)


def test_paths_are_counted_under_their_route():
    assert metrics.endpoint("/v2/models/digits/versions/3/infer") == "/v2/models/{name}/versions/{version}/infer"
    assert metrics.endpoint("/v2/models/digits") == "/v2/models/{name}"
    assert metrics.endpoint("/predict") == "/predict"
    assert metrics.endpoint("/wp-admin/x") == "other"


# --- a served model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(quickstart):
    """`cnnlab serve models:/digits/1` with an API key."""
    cwd = quickstart[0]
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env["CNNLAB_TEST_KEY"] = KEY
    command = [sys.executable, "-m", "cnnlab", "serve", "models:/digits/1", "--api-key-env", "CNNLAB_TEST_KEY"]
    command += ["--max-body-bytes", 300000, "--max-images", 64]
    with serving(command, cwd, env, cwd / "serve-protocols.log") as (url, process):
        yield {"url": url, "process": process, "cwd": cwd}


@pytest.fixture(scope="module")
def digits():
    samples = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits["test"]
    return [samples.raw(i) for i in range(40)], [str(samples.labels[i]) for i in range(40)]


@pytest.mark.slow
def test_tritonclient_infers_the_right_labels_in_json_binary_and_pixels(server, digits):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    images, labels = digits
    client = triton.InferenceServerClient(server["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()  # the probes need no key
    assert client.is_model_ready("digits", headers=dict(AUTH)) and not client.is_model_ready("nope", headers=dict(AUTH))
    metadata = client.get_model_metadata("digits", headers=dict(AUTH))
    assert metadata["versions"] == ["1"] and metadata["outputs"][0]["shape"] == [-1, 10]

    binary = triton.InferInput("image", [len(images)], "BYTES")
    binary.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)  # raw PNG bytes
    text = triton.InferInput("image", [len(images)], "BYTES")
    text.set_data_from_numpy(np.array([b64(i).encode() for i in images], dtype=object), binary_data=False)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    batch = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    batch.set_data_from_numpy(pixels)
    answers = [
        client.infer("digits", [binary], headers=dict(AUTH)),
        client.infer("digits", [text], model_version="1", request_id="r1", headers=dict(AUTH)),
        client.infer("digits", [batch], headers=dict(AUTH)),
    ]
    predicted = [[str(x, "utf-8") if isinstance(x, bytes) else x for x in a.as_numpy("label")] for a in answers]
    assert predicted[0] == predicted[1] == predicted[2]
    assert np.mean(np.array(predicted[0]) == np.array(labels)) >= 0.9
    probabilities = answers[0].as_numpy("probabilities")
    assert probabilities.shape == (len(images), 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    assert answers[1].get_response()["id"] == "r1" and answers[1].get_response()["model_version"] == "1"
    for name, version, headers in [("nope", "", AUTH), ("digits", "2", AUTH), ("digits", "", {})]:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(name, [binary], model_version=version, headers={**headers})  # it adds to the dict
        assert refused.value.status() == ("401" if not headers else "404"), refused.value


@pytest.mark.slow
def test_invocations_answer_as_mlflow_models_serve_does(server, digits):
    """The same requests, as MLflow's docs show them, to `mlflow models serve` of the same version."""
    images, labels = digits
    split = {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}
    records = {"dataframe_records": [{"image": b64(i)} for i in images]}
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `mlflow models serve` runs uvicorn
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = f"sqlite:///{server['cwd']}/mlruns/mlflow.db"
    command = [Path(sys.executable).parent / "mlflow", "models", "serve", "-m", "models:/digits/1"]
    command += ["--env-manager", "local", "--host", "127.0.0.1"]
    assert requests.get(f"{server['url']}/ping", timeout=10).status_code == 200
    with serving(command, server["cwd"], env, server["cwd"] / "mlflow-serve.log") as (theirs, _):
        for body in (split, records):
            ours = requests.post(f"{server['url']}/invocations", json=body, headers=dict(AUTH), timeout=60)
            reference = requests.post(f"{theirs}/invocations", json=body, timeout=60)
            assert ours.status_code == reference.status_code == 200, (ours.text[:300], reference.text[:300])
            ours, reference = ours.json()["predictions"], reference.json()["predictions"]
            assert [p["label"] for p in ours] == [p["label"] for p in reference]
            assert np.allclose([p["probabilities"] for p in ours], [p["probabilities"] for p in reference], atol=1e-5)
            assert [p["label"] for p in ours] != [None] * len(ours) and set(ours[0]) == set(reference[0])
        for body in (b"{", b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}'):  # both refuse with a 400
            ours = requests.post(
                f"{server['url']}/invocations", data=body, headers={**AUTH, "Content-Type": "application/json"}
            )
            reference = requests.post(f"{theirs}/invocations", data=body, headers={"Content-Type": "application/json"})
            assert ours.status_code == reference.status_code == 400 and ours.json()["error_code"]


@pytest.mark.slow
def test_metrics_parse_and_count_the_requests_sent(server, digits):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = requests.get(f"{server['url']}/metrics", headers=dict(AUTH), timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def count(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    before = scrape()
    images = digits[0][:6]
    for image in images:
        requests.post(f"{server['url']}/predict", data=image, headers={**AUTH, "Content-Type": "image/png"})
    requests.post(f"{server['url']}/v2/models/digits/infer", json=v2_body(images), headers=dict(AUTH))
    requests.post(f"{server['url']}/v2/models/nope/infer", json=v2_body(images), headers=dict(AUTH))
    requests.post(f"{server['url']}/predict", data=b"not an image", headers={**AUTH, "Content-Type": "image/png"})
    after = scrape()
    sent = {("/predict", "200"): 6, ("/v2/models/{name}/infer", "200"): 1, ("/v2/models/{name}/infer", "404"): 1}
    sent[("/predict", "415")] = 1
    for (route, status), n in sent.items():
        labels = {"endpoint": route, "status": status}
        assert count(after, "cnnlab_requests_total", **labels) - count(before, "cnnlab_requests_total", **labels) == n
    assert count(after, "cnnlab_images_total") - count(before, "cnnlab_images_total") == 12  # 6 alone, 6 in one
    calls = count(after, "cnnlab_batch_images_count") - count(before, "cnnlab_batch_images_count")
    assert calls == count(after, "cnnlab_model_calls_total") - count(before, "cnnlab_model_calls_total") >= 2
    latency = count(after, "cnnlab_request_seconds_count", endpoint="/predict")
    assert latency - count(before, "cnnlab_request_seconds_count", endpoint="/predict") == 7
    info = [dict(labels) for (name, labels), value in after.items() if name == "cnnlab_model_info" and value == 1]
    assert [(i["name"], i["version"], i["engine"]) for i in info] == [("digits", "1", "onnxruntime")] and len(
        info[0]["digest"]
    ) == 64
    assert count(after, "cnnlab_requests_in_flight") == 1  # the scrape itself


JSON = {"Content-Type": "application/json"}
V2_MALFORMED = [
    (JSON, b"{"),
    (JSON, b"[]"),
    (JSON, b'{"inputs": [{"name": "x", "shape": [1, 99999, 99999, 3], "datatype": "UINT8", "data": []}]}'),
    (JSON, b'{"inputs": [{"shape": [1, 400, 400, 3], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}]}'),
    ({"Inference-Header-Content-Length": "abc"}, b"{}"),
    ({"Inference-Header-Content-Length": "99"}, b"{}"),
    (JSON, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [[[[["a"]]]]]}]}'),
    (JSON, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}'),
    (JSON, json.dumps({"inputs": [{"shape": [65], "datatype": "BYTES", "data": ["a"] * 65}]}).encode()),
    (JSON, b'{"inputs": [{"shape": [1], "datatype": "BYTES", "data": ["a"]}], "parameters": {"min_confidence": 7}}'),
    (JSON, b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.slow
def test_fuzzed_v2_and_invocations_bodies_get_4xx_and_valid_neighbours_200(server, digits):
    rng = np.random.default_rng(1)
    images = digits[0][:2]
    valid_v2 = json.dumps(v2_body(images)).encode()
    valid_mlflow = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}).encode()
    bad = [("/v2/models/digits/infer", h, b) for h, b in V2_MALFORMED]
    for i in range(60):
        path, body = ("/v2/models/digits/infer", valid_v2) if i % 2 else ("/invocations", valid_mlflow)
        bad.append((path, {"Content-Type": "application/json"}, mutated(body, rng)))
    valid = [
        ("/v2/models/digits/infer", {}, valid_v2),
        ("/invocations", {"Content-Type": "application/json"}, valid_mlflow),
    ]

    def send(item):
        path, headers, body = item
        response = requests.post(f"{server['url']}{path}", data=body, headers={**AUTH, **headers}, timeout=60)
        shape_key = "error" if path.startswith("/v2") else "error_code"
        return item in valid, response.status_code, response.status_code == 200 or shape_key in response.json()

    partners = (valid * len(bad))[: len(bad)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, [x for pair in zip(bad, partners) for x in pair]))
    assert [s for is_valid, s, _ in results if is_valid] == [200] * len(partners)
    assert all(s < 500 and shaped for _, s, shaped in results), sorted({s for _, s, _ in results})
