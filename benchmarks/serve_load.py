"""A bounded load on `cnnlab serve` and on `mlflow models serve --env-manager local`, same registered model.

N requests, one image each, at concurrency C, on loopback only, to each of cnnlab's protocols in turn (/predict,
Open Inference v2 with binary and JSON tensors, MLflow's /invocations), to MLflow's server and to a minimal
hand-written server (uvicorn, the same decode and predict per request, no batching); and the raw runtime: the
same network, batch size (C) and threads, no HTTP. Prints req/s, p50 and p99 latency of each, and the ratios
(targets at concurrency 16: >= 3x the throughput of mlflow models serve and a lower p99; >= 1.5x the minimal
server; >= 0.7 of raw; each protocol's cost against /predict).
Run it in a project folder whose store holds the model (e.g. after `make quickstart` and
`cnnlab register ... --name digits && cnnlab promote digits`).

    python benchmarks/serve_load.py [--model models:/digits@champion] [--requests 800] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

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


def minimal_server(model: str, port: int, threads: int) -> None:
    """The least a server can do: uvicorn, one process, per request the model's own decode and predict."""
    import numpy as np
    import uvicorn

    from cnnlab import load as load_model

    network = load_model.model(model, threads)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] == "/predict":
            probs = network.probabilities([body])[0]
            answer = {"label": network.classes[int(np.argmax(probs))], "probability": float(probs.max())}
        else:
            answer = {"status": "ok"}
        data = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def raw(model: str, image: bytes, n: int, batch: int, threads: int) -> dict:
    """The runtime alone: the model's decode and predict on batches of `batch` images, no HTTP, no queue."""
    from cnnlab import load as load_model

    network = load_model.model(model, threads)
    images = [image] * batch
    for _ in range(3):
        network.logits(images, batch)
    began = time.perf_counter()
    for _ in range(max(1, n // batch)):
        network.logits(images, batch)
    elapsed = time.perf_counter() - began
    per = 1000 * elapsed / max(1, n // batch)
    return {"rps": max(1, n // batch) * batch / elapsed, "p50": per, "p99": per, "errors": 0}


async def _connection(port: int, request: bytes, tickets: list, latencies: list, statuses: list) -> None:
    """One keep-alive connection sending `request` until the tickets run out; HTTP/1.1 read by hand, so the
    client costs little of the cores it shares with the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while tickets:
            tickets.pop()
            began = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                length = int(value) if key.lower() == "content-length" else length
                chunked = chunked or (key.lower() == "transfer-encoding" and "chunked" in value)
            if chunked:
                while size := int((await reader.readline()).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            else:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - began)
            statuses.append(status)
    finally:
        writer.close()


def load(port: int, path: str, body: bytes, headers: dict, n: int, concurrency: int) -> dict:
    """n requests over `concurrency` keep-alive connections (after an unrecorded tenth to warm them up)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(body)}.items())
    request = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body

    async def run(count: int) -> tuple[list, list, float]:
        tickets, latencies, statuses = list(range(count)), [], []
        began = time.perf_counter()
        await asyncio.gather(*(_connection(port, request, tickets, latencies, statuses) for _ in range(concurrency)))
        return latencies, statuses, time.perf_counter() - began

    asyncio.run(run(max(concurrency, n // 10)))
    latencies, statuses, elapsed = asyncio.run(run(n))
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
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of the model, as serve's")
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minimal_server:
        minimal_server(args.model, args.minimal_server, args.threads)
        return 0
    if args.image:
        image = open(args.image, "rb").read()
    else:
        from cnnlab.data import DataModule

        image = DataModule("digits", num_workers=0).splits["test"].raw(0)
    results, n, c = {}, args.requests, args.concurrency

    port = free_port()
    server = start(
        [sys.executable, "-m", "cnnlab", "serve", args.model, "--port", str(port)], f"http://127.0.0.1:{port}/health"
    )
    name = requests.get(f"http://127.0.0.1:{port}/info", timeout=10).json()["name"] or "model"
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
    split = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}).encode()
    as_json = {"Content-Type": "application/json"}
    ours = {  # each protocol on the same server, one after the other: (path, body, headers)
        "cnnlab serve /predict": ("/predict", image, {"Content-Type": "image/png"}),
        "cnnlab serve /v2 binary": (f"/v2/models/{name}/infer", header + tensor, binary_headers),
        "cnnlab serve /v2 JSON": (f"/v2/models/{name}/infer", json.dumps(v2_json).encode(), as_json),
        "cnnlab serve /invocations": ("/invocations", split, as_json),
    }
    try:  # one unrecorded pass first: the model's first batches of each size are slow (measured: the first row's p99)
        load(port, *ours["cnnlab serve /predict"], n // 2, c)
        for row, (path, body, headers) in ours.items():
            results[row] = load(port, path, body, headers, n, c)
    finally:
        stop(server)

    port = free_port()
    command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads)]
    server = start([*command, "--minimal-server", str(port)], f"http://127.0.0.1:{port}/health")
    try:
        load(port, "/predict", image, {"Content-Type": "image/png"}, n // 2, c)
        results["minimal uvicorn server"] = load(port, "/predict", image, {"Content-Type": "image/png"}, n, c)
    finally:
        stop(server)
    results["raw runtime (no HTTP)"] = raw(args.model, image, args.requests, args.concurrency, args.threads)

    port = free_port()
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
        results["mlflow models serve"] = load(port, "/invocations", split, as_json, n, c)
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
    minimal, alone = results["minimal uvicorn server"], results["raw runtime (no HTTP)"]
    print(
        f"cnnlab serve /predict: {ours['rps'] / minimal['rps']:.2f}x the minimal server (target >= 1.5), "
        f"{ours['rps'] / alone['rps']:.2f} of the raw runtime at batch {args.concurrency} (target >= 0.7)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
