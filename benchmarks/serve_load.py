"""A bounded load on `cnnlab serve` and on `mlflow models serve --env-manager local`, same registered model.

N requests, one image each, at concurrency C, on loopback only, to each of cnnlab's protocols in turn (/predict,
Open Inference v2 with binary and JSON tensors, MLflow's /invocations) and to MLflow's server. Prints req/s, p50
and p99 latency of each, and the ratios (target: >= 3x the throughput of mlflow models serve at concurrency 16,
lower p99; each protocol's cost against /predict).
Run it in a project folder whose store holds the model (e.g. after `make quickstart` and
`cnnlab register ... --name digits && cnnlab promote digits`).

    python benchmarks/serve_load.py [--model models:/digits@champion] [--requests 800] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], ready_url: str) -> subprocess.Popen:
    from cnnlab.store import default_tracking_uri

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": default_tracking_uri(),  # mlflow resolves models:/ in the same store
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
    }  # its uvicorn, without activating
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}")
        try:
            if requests.get(ready_url, timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{command[:4]} did not become ready")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def load(send, n: int, concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:  # warm up every connection and the model (10% of the requests)
        list(pool.map(lambda _: send(), range(max(concurrency, n // 10))))
    latencies = []

    def one(_):
        start = time.perf_counter()
        status = send()
        latencies.append(time.perf_counter() - start)
        return status

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": n / elapsed,
        "p50": 1000 * statistics.median(latencies),
        "p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": sum(s != 200 for s in statuses),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/digits@champion")
    parser.add_argument("--image", help="a PNG/JPEG to send (default: a digits test image)")
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.image:
        image = open(args.image, "rb").read()
    else:
        from cnnlab.data import DataModule

        image = DataModule("digits", num_workers=0).splits["test"].raw(0)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=args.concurrency, pool_maxsize=args.concurrency)
    session.mount("http://", adapter)
    results = {}

    port = free_port()
    server = start(
        [sys.executable, "-m", "cnnlab", "serve", args.model, "--port", str(port)], f"http://127.0.0.1:{port}/health"
    )
    url = f"http://127.0.0.1:{port}"
    name = requests.get(f"{url}/info", timeout=10).json()["name"] or "model"
    encoded = base64.b64encode(image).decode()
    v2_json = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    tensor = len(image).to_bytes(4, "little") + image  # the binary-data extension, as tritonclient sends it
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(tensor)}}
            ]
        }
    ).encode()
    binary_headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    split = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}
    ours = {  # each protocol on the same server, one after the other
        "cnnlab serve /predict": lambda: session.post(
            f"{url}/predict", data=image, timeout=60, headers={"Content-Type": "image/png"}
        ),
        "cnnlab serve /v2 binary": lambda: session.post(
            f"{url}/v2/models/{name}/infer", data=header + tensor, timeout=60, headers=binary_headers
        ),
        "cnnlab serve /v2 JSON": lambda: session.post(f"{url}/v2/models/{name}/infer", json=v2_json, timeout=60),
        "cnnlab serve /invocations": lambda: session.post(f"{url}/invocations", json=split, timeout=60),
    }
    try:  # one unrecorded pass first: the model's first batches of each size are slow (measured: the first row's p99)
        load(lambda: ours["cnnlab serve /predict"]().status_code, args.requests // 2, args.concurrency)
        for row, send in ours.items():
            results[row] = load(lambda send=send: send().status_code, args.requests, args.concurrency)
    finally:
        stop(server)

    port = free_port()
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
    server = start(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            args.model,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        f"http://127.0.0.1:{port}/ping",
    )
    try:
        results["mlflow models serve"] = load(
            lambda: session.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60).status_code,
            args.requests,
            args.concurrency,
        )
    finally:
        stop(server)

    print(f"\n{args.requests} requests of one image at concurrency {args.concurrency}, {args.model}, loopback")
    print(f"{'server':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for row, r in results.items():
        print(f"{row:<26} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['errors']:>7}")
    ours, theirs = results["cnnlab serve /predict"], results["mlflow models serve"]
    print(
        f"throughput ratio {ours['rps'] / theirs['rps']:.2f}x (target >= 3x), p99 ratio "
        f"{ours['p99'] / theirs['p99']:.2f} (target < 1)"
    )
    for row in ("cnnlab serve /v2 binary", "cnnlab serve /v2 JSON", "cnnlab serve /invocations"):
        print(f"{row} against /predict: {results[row]['rps'] / ours['rps']:.2f}x the throughput")
    same = results["cnnlab serve /invocations"]["rps"] / theirs["rps"]
    print(f"/invocations: cnnlab serve {same:.2f}x mlflow models serve (the same request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
