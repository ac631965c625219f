"""The prediction service as a real process on a loopback port: agreement, batching, bad inputs, auth,
alias hot swap under load, and a shutdown that leaves nothing behind."""

import base64
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cnnlab.data import DataModule
from conftest import CHROMIUM_ARGS, STORE_VARIABLES, cnnlab_here, mutated, processes, require, serving

KEY = "s3cret-test-key"
AUTH = {"X-API-Key": KEY}


def session_processes(sid: int) -> list[int]:
    """Processes of a session (the server starts its own)."""
    return processes(3, sid)


@pytest.fixture(scope="module")
def server(quickstart):
    """`cnnlab serve models:/swap@champion` following its alias, with small limits and an API key."""
    cwd, _, run, _ = quickstart
    for _ in range(2):  # two versions of the same model: enough to watch the alias move
        assert cnnlab_here("register", run.info.run_id, "--name", "swap", cwd=cwd).returncode == 0
    assert cnnlab_here("promote", "swap", "--version", "1", "--force", cwd=cwd).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env["CNNLAB_TEST_KEY"] = KEY
    command = [sys.executable, "-m", "cnnlab", "serve", "models:/swap@champion", "--follow-alias"]
    command += ["--poll-seconds", 1, "--api-key-env", "CNNLAB_TEST_KEY", "--max-batch-size", 16]
    command += ["--batch-timeout-ms", 20, "--max-body-bytes", 300000, "--max-pixels", 90000, "--max-images", 400]
    with serving(command, cwd, env, cwd / "serve.log") as (url, process):
        yield {"url": url, "process": process, "cwd": cwd}


@pytest.fixture(scope="module")
def digits():
    samples = DataModule("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, num_workers=0).splits["test"]
    return [samples.raw(i) for i in range(len(samples))], samples.labels


@pytest.mark.slow
def test_served_predictions_agree_with_the_offline_model(server, digits, quickstart):
    import mlflow
    import pandas as pd

    images, labels = digits
    mlflow.set_tracking_uri(f"sqlite:///{server['cwd']}/mlruns/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{server['cwd']}/mlruns/mlflow.db")
    answers = mlflow.pyfunc.load_model("models:/swap/1").predict(pd.DataFrame({"image": images}))
    offline, scores = answers["label"].tolist(), answers["score"].to_numpy()
    batch = requests.post(
        f"{server['url']}/predict",
        headers=AUTH,
        timeout=60,
        json={"images": [base64.b64encode(i).decode() for i in images]},
    )
    assert batch.status_code == 200, batch.text
    served = [p["label"] for p in batch.json()["predictions"]]
    assert served == offline  # 100% agreement
    served_scores = np.array([p["probability"] for p in batch.json()["predictions"]])
    assert np.allclose(served_scores, scores, atol=1e-5)  # the same calibrated probabilities
    low, high = sorted(set(scores.round(5)))[:2]
    threshold = (low + high) / 2  # between the two least confident images: only the least is unsure
    unsure = requests.post(
        f"{server['url']}/predict?min_confidence={threshold}",
        headers=AUTH,
        timeout=60,
        json={"images": [base64.b64encode(i).decode() for i in images]},
    ).json()["predictions"]
    assert [p["unsure"] for p in unsure] == list(scores < threshold) and sum(scores < threshold) >= 1
    assert all(p["label"] is None and len(p["top_k"]) == 5 for p in unsure if p["unsure"])
    raw = requests.post(
        f"{server['url']}/predict?top_k=3", data=images[0], timeout=30, headers={**AUTH, "Content-Type": "image/png"}
    ).json()
    form = requests.post(
        f"{server['url']}/predict", files={"file": ("a.png", images[0], "image/png")}, headers=AUTH, timeout=30
    ).json()
    assert raw["predictions"][0]["label"] == form["predictions"][0]["label"] == offline[0]
    assert len(raw["predictions"][0]["top_k"]) == 3 and raw["model"] == {"name": "swap", "version": "1"}


def test_info_health_and_openapi(server):
    info = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()
    assert info["name"] == "swap" and info["alias"] == "champion" and info["input_size"] == 16
    assert info["classes"] == [str(i) for i in range(10)] and info["runtime"] == "torch"
    assert info["engine"] == "onnxruntime"  # a fit's program runs its ONNX twin on a CPU


def test_the_server_loads_the_very_artifact_the_gate_evaluated(server):
    from conftest import mlflow_client

    version = mlflow_client(f"sqlite:///{server['cwd']}/mlruns/mlflow.db").get_model_version("swap", "1")
    info = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()
    assert version.tags["promotion.runtime"] == info["runtime"] == "torch"
    assert version.tags["promotion.engine"] == info["engine"] == "onnxruntime"  # the gate ran what serves
    assert len(info["sha256"]) == 64 and version.tags["promotion.sha256"] == info["sha256"]
    served = next(Path(version.source.removeprefix("file://")).rglob("cnnlab.json"))
    assert info["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()  # the digest of the file it loaded
    assert requests.get(f"{server['url']}/health", timeout=10).status_code == 200  # no key needed
    schema = requests.get(f"{server['url']}/openapi.json", headers=AUTH, timeout=10).json()
    assert "image/*" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


@pytest.mark.slow
def test_concurrent_requests_are_batched(server, digits):
    before = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()

    def one(i):
        return requests.post(
            f"{server['url']}/predict", data=digits[0][i], timeout=60, headers={**AUTH, "Content-Type": "image/png"}
        ).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(64))) == {200}
    after = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()
    requests_served = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests_served == 64 and calls < requests_served / 2, (calls, requests_served)


def test_a_bad_request_fails_alone_and_its_batch_neighbours_succeed(server, digits):
    def one(i):
        data = b"not pixels at all" if i % 4 == 0 else digits[0][i]
        return i, requests.post(
            f"{server['url']}/predict", data=data, timeout=60, headers={**AUTH, "Content-Type": "image/png"}
        )

    before = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    after = requests.get(f"{server['url']}/info", headers=AUTH, timeout=10).json()
    assert [r.status_code for i, r in results if i % 4] == [200] * 36
    assert {r.status_code for i, r in results if i % 4 == 0} == {415}
    assert all(r.json()["detail"].startswith("image 0: not a readable image") for i, r in results if i % 4 == 0)
    assert after["model_calls"] - before["model_calls"] < 36  # they were batched, bad ones beside good ones


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case, status",
    [
        ("no key", 401),
        ("wrong key", 401),
        ("empty", 400),
        ("not an image", 415),
        ("truncated", 400),
        ("wrong type", 415),
        ("bad base64", 400),
        ("bad json", 400),
        ("json without images", 400),
        ("too many bytes", 413),
        ("too many pixels", 413),
        ("multipart without file", 400),
    ],
)
def test_every_bad_input_gets_its_4xx_as_json(server, case, status):
    headers, data, json_body, files = {**AUTH, "Content-Type": "image/png"}, png(16), None, None
    if case == "no key":
        headers = {"Content-Type": "image/png"}
    elif case == "wrong key":
        headers = {"X-API-Key": "nope", "Content-Type": "image/png"}
    elif case == "empty":
        data = b""
    elif case == "not an image":
        data = b"hello, not pixels"
    elif case == "truncated":
        data = png(64)[:60]
    elif case == "wrong type":
        headers = {**AUTH, "Content-Type": "text/plain"}
    elif case == "bad base64":
        headers, data, json_body = AUTH, None, {"images": ["@@@"]}
    elif case == "bad json":
        headers, data = {**AUTH, "Content-Type": "application/json"}, b"{nope"
    elif case == "json without images":
        headers, data, json_body = AUTH, None, {"pictures": []}
    elif case == "too many bytes":
        data = np.random.default_rng(0).integers(0, 255, 400_000, dtype=np.uint8).tobytes()
    elif case == "too many pixels":
        data = png(400)
    elif case == "multipart without file":
        headers, data, files = AUTH, {"field": "value"}, {"x": (None, "text only")}
    response = requests.post(
        f"{server['url']}/predict", headers=headers, data=data, json=json_body, files=files, timeout=30
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json") and response.json()["detail"]


def multipart(boundary: str = "cnnlab-test") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png(16)
        + f"\r\n--{boundary}--\r\n".encode()
    )


B64 = base64.b64encode(png(16)).decode()
MALFORMED = {  # every request that once answered 500, or 200 for a broken body: (headers, body, query)
    "multipart without boundary": ({"Content-Type": "multipart/form-data"}, multipart(), ""),
    "multipart, wrong boundary": ({"Content-Type": "multipart/form-data; boundary=other"}, multipart(), ""),
    "multipart, truncated": ({"Content-Type": "multipart/form-data; boundary=cnnlab-test"}, multipart()[:90], ""),
    "top_k abc": ({"Content-Type": "application/json"}, json.dumps({"images": [B64], "top_k": "abc"}), ""),
    "top_k Infinity": ({"Content-Type": "application/json"}, f'{{"images": ["{B64}"], "top_k": Infinity}}', ""),
    "top_k NaN": ({"Content-Type": "application/json"}, f'{{"images": ["{B64}"], "top_k": NaN}}', ""),
    "top_k [1]": ({"Content-Type": "application/json"}, json.dumps({"images": [B64], "top_k": [1]}), ""),
    "top_k of 5000 digits": (
        {"Content-Type": "application/json"},
        f'{{"images": ["{B64}"], "top_k": {"9" * 5000}}}',
        "",
    ),
    "JSON nested 100k deep": ({"Content-Type": "application/json"}, "[" * 100_000 + "]" * 100_000, ""),
    "query top_k superscript two": ({"Content-Type": "image/png"}, png(16), "?top_k=%C2%B2"),
    "401 images": ({"Content-Type": "application/json"}, json.dumps({"images": [B64] * 401}), ""),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_a_4xx_never_a_500(server, case):
    headers, body, query = MALFORMED[case]
    response = requests.post(f"{server['url']}/predict{query}", data=body, headers={**AUTH, **headers}, timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json") and response.json()["detail"]


def test_odd_headers_and_extreme_shapes_are_served(server):
    odd = {"X-Odd": b"\xff\xfe not utf-8"}
    assert requests.get(f"{server['url']}/health", headers=odd, timeout=10).status_code == 200
    ok = requests.post(
        f"{server['url']}/predict", data=png(16), headers={**AUTH, **odd, "Content-Type": "image/png"}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    strip = io.BytesIO()
    Image.fromarray(np.zeros((1, 80_000, 3), np.uint8)).save(strip, "PNG")  # enlarged 16x, it would be 1.28M px long
    wide = requests.post(
        f"{server['url']}/predict", data=strip.getvalue(), timeout=30, headers={**AUTH, "Content-Type": "image/png"}
    )
    assert wide.status_code == 200, wide.text


def server_rss_mb(process) -> float:
    total = 0
    for pid in session_processes(process.pid):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
        except OSError:
            continue
    return total / 1e6


@pytest.mark.slow
def test_fuzzed_bodies_get_4xx_and_valid_neighbours_200_within_a_memory_bound(server, digits):
    """The malformed list and 60 random mutations of valid bodies, each beside a valid request."""
    rng = np.random.default_rng(0)
    valid = [(digits[0][i], {"Content-Type": "image/png"}, "") for i in range(40)]
    bad = [(body, headers, query) for headers, body, query in MALFORMED.values()]
    for i in range(60):
        body = mutated(digits[0][i] if i % 2 else json.dumps({"images": [B64, B64]}).encode(), rng)
        bad.append((body, {"Content-Type": "image/png" if i % 2 else "application/json"}, ""))
    before = server_rss_mb(server["process"])

    def send(item):
        body, headers, query = item
        response = requests.post(f"{server['url']}/predict{query}", data=body, timeout=60, headers={**AUTH, **headers})
        return item in valid, response.status_code

    partners = (valid * 3)[: len(bad)]
    mixed = [x for pair in zip(bad, partners) for x in pair]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, mixed))
    assert [s for is_valid, s in results if is_valid] == [200] * len(partners)
    assert all(s < 500 for _, s in results), sorted({s for _, s in results})
    assert server_rss_mb(server["process"]) - before < 300  # stated bound: +300 MB under this load


@pytest.mark.slow
def test_alias_swap_under_load_fails_no_request(server, digits):
    cwd, url = server["cwd"], server["url"]
    results, stop = [], threading.Event()

    def load():
        session = requests.Session()
        i = 0
        while not stop.is_set():
            response = session.post(
                f"{url}/predict", data=digits[0][i % 50], timeout=60, headers={**AUTH, "Content-Type": "image/png"}
            )
            results.append((response.status_code, response.json().get("model", {}).get("version")))
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    assert cnnlab_here("promote", "swap", "--version", "2", "--force", cwd=cwd).returncode == 0
    deadline = time.time() + 120
    while requests.get(f"{url}/info", headers=AUTH, timeout=10).json()["version"] != "2" and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert requests.get(f"{url}/info", headers=AUTH, timeout=10).json()["version"] == "2"
    assert [s for s, _ in results if s != 200] == []
    served = {  # the swap shows in /metrics: the new version's info series is 1, the old one's 0
        s.labels["version"]: s.value
        for family in text_string_to_metric_families(requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text)
        for s in family.samples
        if s.name == "cnnlab_model_info"
    }
    assert served == {"1": 0, "2": 1}, served
    assert {v for _, v in results} == {"1", "2"} and results[-1][1] == "2"


@pytest.mark.slow
def test_the_page_classifies_a_dropped_digit_with_the_key_typed_into_it(server, digits, tmp_path):
    """GET / in a real headless Chromium: no key, the page says the server needs it; the key typed once, an
    uploaded digit comes back with its label and probability, from the same /predict any client uses."""
    executable = require("CNNLAB_TEST_CHROMIUM", "Chromium")
    from playwright.sync_api import sync_playwright

    images, labels = digits
    page_html = requests.get(server["url"] + "/", timeout=30)
    assert page_html.status_code == 200 and "text/html" in page_html.headers["content-type"]
    assert "http://" not in page_html.text.replace(server["url"], "") and "https://" not in page_html.text  # no CDN
    known = requests.post(server["url"] + "/predict", data=images[0], headers={**AUTH, "Content-Type": "image/png"})
    expected = known.json()["predictions"][0]
    assert expected["label"] == str(labels[0]) or expected["unsure"]
    (tmp_path / "digit.png").write_bytes(images[0])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server["url"] + "/", timeout=60_000)
        page.get_by_text("needs its API key").wait_for(timeout=30_000)
        page.set_input_files("#files", str(tmp_path / "digit.png"))
        page.locator(".card .error").first.wait_for(timeout=30_000)
        assert "API key" in page.locator(".card .error").first.inner_text()
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.get_by_text("swap version").wait_for(timeout=30_000)
        page.set_input_files("#files", str(tmp_path / "digit.png"))
        answer = page.locator(".card .answer:not(.error)").first
        answer.wait_for(timeout=30_000)
        shown = answer.inner_text()
        browser.close()
    if expected["unsure"]:
        assert shown.startswith("unsure")
    else:
        assert shown.startswith(f"{expected['label']} ") and shown.endswith("%")


def test_shutdown_answers_the_requests_in_flight_and_leaves_no_process_behind(server, digits):
    """SIGTERM (what Kubernetes sends) under load: every request sent before it is answered."""
    process, url, signalled, results = server["process"], server["url"], [float("inf")], []
    assert len(session_processes(process.pid)) >= 2  # the server and its workers

    def load():
        for i in range(10_000):
            began = time.monotonic()
            try:
                response = requests.post(
                    f"{url}/predict", data=digits[0][i % 50], timeout=60, headers={**AUTH, "Content-Type": "image/png"}
                )
                results.append((began < signalled[0], response.status_code))
            except requests.ConnectionError:  # refused or reset: a new request after the signal
                results.append((began < signalled[0], None))
                return

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1)
    signalled[0] = time.monotonic() - 0.05  # requests begun this long before the signal have surely connected
    process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert process.wait(timeout=60) == 0  # a stop is no error
    assert {status for before, status in results if before} == {200}, results[-20:]
    log = (server["cwd"] / "serve.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log and "cnnlab serve: stopped" in log, log[-3000:]
    deadline = time.time() + 30
    while session_processes(process.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert session_processes(process.pid) == []
