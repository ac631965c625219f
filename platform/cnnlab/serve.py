"""`cnnlab serve MODEL_URI`: a LitServe prediction service with dynamic batching, hot alias swap and
hardened inputs.

    POST /predict   an image as raw bytes (Content-Type image/*), as multipart file(s), or JSON
                    {"images": [base64, ...]} for a batch; ?top_k=N, ?min_confidence=P. Answers the label (null
                    and "unsure": true below the confidence threshold) and the top-k labels with probabilities.
    GET  /health    200 once the workers are ready.
    GET  /info      model name, version, alias, classes, input size, backend, and per-worker counters.
    GET  /docs, /openapi.json
    /v2/...         the Open Inference Protocol v2 (KServe, Triton): probes, model metadata, infer
    GET  /ping, POST /invocations   MLflow's scoring protocol, answered as `mlflow models serve` answers
    GET  /metrics   Prometheus metrics of every process (cnnlab.metrics)

Bodies reach the workers as JSON (the gate, cnnlab.gate, turns raw and multipart images and the other protocols'
requests into it, cnnlab.protocols), where each request is decoded and center-cropped, then concurrent requests
are stacked into one model call. The workers count in shared memory and describe what they loaded in a file
written at each load (not per request); the main process loads no model.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import litserve as ls
import numpy as np
from fastapi import HTTPException

from cnnlab import UserError, metrics, protocols
from cnnlab.cnnlab_model import RUNTIMES, read_image, softmax
from cnnlab.gate import ERROR_KEY, PREDICT_OPENAPI, Gate


class Counters:
    """Each worker's requests, images and model calls, in memory shared with the server: a worker adds to its own
    slot alone (no lock, no file); the API server, a fork of the main process, reads them for /info."""

    FIELDS = ("requests", "images", "model_calls")

    def __init__(self, workers: int):
        spawn = multiprocessing.get_context("spawn")  # LitServe starts its workers with spawn
        self.slots = spawn.Value("i", 0)
        self.values = spawn.Array("q", workers * len(self.FIELDS), lock=False)

    def claim(self) -> int:
        """A worker's slot, claimed once at its start."""
        with self.slots.get_lock():
            self.slots.value += 1
            return self.slots.value - 1

    def add(self, slot: int, **counts: int) -> None:
        for name, value in counts.items():
            self.values[slot * len(self.FIELDS) + self.FIELDS.index(name)] += value

    def read(self, slot: int) -> dict[str, int]:
        start = slot * len(self.FIELDS)
        return dict(zip(self.FIELDS, self.values[start : start + len(self.FIELDS)]))


class ImageClassifierAPI(ls.LitAPI):
    """One worker: decode and crop each request, stack concurrent ones, run the model, answer top-k."""

    def __init__(
        self,
        uri: str,
        max_pixels: int,
        max_decode_seconds: float,
        follow_alias: float,
        state_dir: str,
        counters: Counters,
        threads: int,
        max_batch_size: int,
        batch_timeout: float,
        runtime: str | None = None,
        device: str = "cpu",
        thresholds: tuple[float | None, float | None] = (None, None),
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.thresholds = thresholds  # --min-confidence, --target-precision
        self.uri, self.max_pixels, self.max_decode_seconds = uri, max_pixels, max_decode_seconds
        self.runtime, self.requested_device = runtime, device
        self.follow_alias, self.state_dir, self.threads, self.counters = follow_alias, state_dir, threads, counters

    def setup(self, device):
        import torch

        torch.set_num_threads(self.threads)
        # LitServe's device for a torch model on a GPU; otherwise the asked-for one (ONNX Runtime's providers)
        self.device = str(device) if str(device).startswith("cuda") else self.requested_device
        self.slot = self.counters.claim()
        self.current = self._load(self.uri)
        if self.follow_alias and "@" in self.uri:
            threading.Thread(target=self._follow, daemon=True).start()

    def _load(self, uri: str):
        """The registered artifact itself, on its own runtime: what the promotion gate evaluated."""
        from cnnlab import load
        from cnnlab.calibration import answer_threshold

        loaded = load.model(uri, self.threads, self.device, self.runtime)
        loaded.min_confidence = answer_threshold(loaded.meta, loaded.min_confidence, *self.thresholds)[0]
        if uri != self.uri:  # a pinned version loaded for the alias: keep the alias's name
            loaded.alias, loaded.source = self.uri.partition("@")[2], self.uri
        self._write_state(loaded)
        info = metrics.families().model
        if getattr(self, "current", None):  # a swap: the old version's series drops to 0
            info.labels(*self._labels(self.current)).set(0)
        info.labels(*self._labels(loaded)).set(1)
        return loaded

    @staticmethod
    def _labels(loaded) -> tuple:
        return (
            loaded.name or "model",
            loaded.version or "",
            loaded.alias or "",
            loaded.runtime,
            loaded.engine,
            loaded.digest,
        )

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
        """What this worker has loaded, for /info: written at each load, never per request."""
        state = {
            "pid": os.getpid(),
            "slot": self.slot,
            "name": loaded.name,
            "version": loaded.version,
            "alias": loaded.alias,
            "uri": self.uri,
            "runtime": loaded.runtime,
            "engine": loaded.engine,
            "sha256": loaded.digest,
            "params": loaded.params,
            "min_confidence": loaded.min_confidence,
            "device": self.device,
        }
        path = Path(self.state_dir) / f"worker-{self.slot}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)

    def decode_request(self, request):
        """One request's images, each decoded and checked on its own; a bad request becomes its own 4xx answer
        (an error item), never an exception: LitServe fails every request of a batch on one exception. The
        request's pixels together stay within --max-pixels, and its decoding within --max-decode-seconds."""
        budget = {"pixels": self.max_pixels, "deadline": time.monotonic() + self.max_decode_seconds}
        try:
            self._check_model(request)
            if "pixels" in request:
                arrays = self._pixels(request["pixels"], request["shape"])
            else:
                arrays = np.stack([self._image(i, text, budget) for i, text in enumerate(request["images"])])
            return {
                "arrays": arrays,
                "top_k": max(1, min(int(request.get("top_k") or 5), len(self.current.classes))),
                **{k: request.get(k) for k in ("min_confidence", "protocol", "outputs", "id")},
            }
        except HTTPException as err:
            return {"error": err.status_code, "detail": err.detail}

    def _check_model(self, request) -> None:
        """An Open Inference request names the model (and maybe the version) it wants: this one, or 404."""
        if request.get("protocol") != "v2":
            return
        name, version = self.current.name or "model", self.current.version
        if request["model"] != name or request["version"] not in (None, version):
            asked = request["model"] + (f" version {request['version']}" if request["version"] else "")
            raise HTTPException(404, f"model {asked} is not served here; {name} version {version} is")

    def _pixels(self, text: str, shape: list[int]) -> np.ndarray:
        """A UINT8 N x H x W x C batch (Open Inference), each image cropped as an encoded one would be."""
        if shape[0] * shape[1] * shape[2] > self.max_pixels:
            raise HTTPException(
                413, f"{shape[0]} x {shape[1]} x {shape[2]} pixels: over --max-pixels {self.max_pixels}"
            )
        batch = np.frombuffer(base64.b64decode(text), np.uint8).reshape(shape)
        return np.stack([self.current.preprocess(image) for image in batch])

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
                {**item, "arrays": None, "probs": output["probs"][start : start + count], "model": output["model"]}
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
            self.counters.add(self.slot, model_calls=1, images=len(probs))
            counts = metrics.families()
            counts.model_calls.inc()
            counts.images.inc(len(probs))
            counts.batch.observe(len(probs))
        self.counters.add(self.slot, requests=len(batch["inputs"]))
        output = {
            **batch,
            "probs": probs,
            "model": {
                "name": current.name or "model",
                "version": current.version,
                "classes": current.classes,
                "min_confidence": current.min_confidence,
            },
        }
        return self.unbatch(output)[0] if single else output

    def encode_response(self, output):
        if "error" in output:  # the Gate turns this into the request's own status
            return {ERROR_KEY: {"status": output["error"], "detail": output["detail"]}}
        classes, threshold = output["model"]["classes"], output.get("min_confidence")
        threshold = output["model"]["min_confidence"] if threshold is None else threshold
        if output.get("protocol") == "v2":
            return protocols.v2_answer(output["probs"], classes, threshold, output["model"], output)
        if output.get("protocol") == "mlflow":  # the pyfunc's answer, as mlflow models serve gives it
            return protocols.mlflow_answer(output["probs"], classes)
        predictions = []
        for row in output["probs"]:
            order = np.argsort(-row)[: output["top_k"]]
            unsure = bool(row[order[0]] < threshold)
            predictions.append(
                {
                    "label": None if unsure else classes[order[0]],
                    "probability": float(row[order[0]]),
                    "unsure": unsure,
                    "top_k": [{"label": classes[i], "probability": float(row[i])} for i in order],
                }
            )
        return {
            "predictions": predictions,
            "model": {"name": output["model"]["name"], "version": output["model"]["version"]},
        }


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
    runtime: Literal[RUNTIMES] | None = None,
    min_confidence: float | None = None,
    target_precision: float | None = None,
) -> int:
    """A prediction service (LitServe) for the model a URI names, on the runtime its artifact holds (torch program,
    ONNX, TorchScript, OpenVINO), or an ONNX one on `runtime`: batching, alias hot swap, hardened inputs.

    Args:
        uri: models:/NAME@ALIAS, models:/NAME/V, a run, a logged-model id, a .ckpt or a `cnnlab export` folder
        device: cpu or cuda[:N] (torch; ONNX on onnxruntime-gpu's providers)
        max_batch_size: concurrent requests stacked into one call
        batch_timeout_ms: how long a batch waits to fill
        workers: model worker processes
        host: bind address (this machine only by default)
        port: the service's port
        follow_alias: poll the registry and swap when the alias moves
        poll_seconds: how often --follow-alias polls
        api_key_env: require the key held in this environment variable (401 without)
        max_body_bytes: larger bodies get 413
        max_pixels: a request whose images together are larger gets 413
        threads: CPU threads per worker (cores / workers)
        max_images: more images in one request get 413
        max_inflight_bytes: request bodies held at once, all together; beyond, 503
        max_decode_seconds: decoding one request beyond this gets 413
        body_timeout: seconds a body may pause before 408
        idle_timeout: seconds an idle keep-alive connection stays open
        runtime: run an ONNX model on this runtime (the artifact's own by default)
        min_confidence: answer unsure (label null, unsure true, the top-k still listed) below this top probability;
            a request may ask its own (?min_confidence=P). Default: the version's min_confidence tag, else 0
        target_precision: choose min_confidence as the lowest threshold whose answers were this precise on the
            model's validation split (recorded in the model; for each version loaded)
    """
    from cnnlab import store
    from cnnlab.calibration import answer_threshold
    from cnnlab.cnnlab_model import engine_of

    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: choose cpu or cuda (cuda:N for one GPU).")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty. Export the key in it.")
    if follow_alias and "@" not in uri:
        raise UserError(f"--follow-alias needs a models:/NAME@ALIAS URI, got {uri}.")
    # a bad URI, runtime or a changed file fails here, not in a worker; the model loads there alone
    meta = store.check(uri)
    try:
        engine = engine_of(meta, runtime, device)
    except ValueError as err:
        raise UserError(f"'{uri}': {err}.") from None
    threshold, why = answer_threshold(meta, 0.0, min_confidence, target_precision)  # checks the flags here
    accelerator = "cpu"
    # ONNX Runtime needs no torch GPU: the workers ask for its CUDA / TensorRT providers (or say in one line why not)
    if device.startswith("cuda") and engine != "onnxruntime":
        import torch

        if engine == "openvino":
            raise UserError(f"--device {device}: OpenVINO runs on the CPU here; serve the ONNX model for CUDA.")
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device}: torch {torch.__version__} sees no CUDA GPU here. Serve on --device cpu."
            )
        accelerator = "cuda"
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    state_dir = tempfile.mkdtemp(prefix="cnnlab-serve-")
    metrics.start(str(Path(state_dir, "metrics")))  # before any serving process counts
    import mlflow.pyfunc.scoring_server  # noqa: F401  (/invocations parses with it: loaded once, before the forks)

    api = ImageClassifierAPI(
        uri,
        max_pixels,
        max_decode_seconds,
        poll_seconds if follow_alias else 0,
        state_dir,
        counters := Counters(workers),
        threads,
        max_batch_size,
        batch_timeout_ms / 1000,
        runtime,
        device,
        (min_confidence, target_precision),
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
        "classes": meta["classes"],
        "input_size": meta["image_size"],
        "crop_pct": meta["crop_pct"],
        "runtime": meta["runtime"],
        "engine": engine,
        "format": meta.get("format"),
        "device": device,
        "max_batch_size": max_batch_size,
        "batch_timeout_ms": batch_timeout_ms,
    }
    protocols.add_routes(server.app, state_dir, counters, static, workers)
    for route in server.app.routes:
        if getattr(route, "path", None) == "/predict":
            route.openapi_extra = PREDICT_OPENAPI

    main = os.getpid()

    def stop(signum, frame):  # LitServe shuts its workers down cleanly on KeyboardInterrupt, not on SIGTERM
        if os.getpid() != main:  # a server process forked by LitServe: uvicorn has closed it, it ends quietly
            raise SystemExit(0)
        # LitServe's monitor thread may log its manager's closed pipe as a crash while it shuts down: a stop
        # asked for is no error, so its shutdown is not logged
        logging.getLogger("litserve").setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    unsure = f"; unsure below {threshold} ({why})" if threshold else ""
    print(f"cnnlab serve: {uri} ({engine} on {device}) at http://{host}:{port}/predict{unsure}", flush=True)
    try:
        server.run(
            host=host, port=port, generate_client_file=False, log_level="warning", timeout_keep_alive=idle_timeout
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM above: the workers are ended; a stop is no error
        pass
    except RuntimeError as err:  # LitServe's "One or more workers failed to start": their error is logged above
        raise UserError(f"cnnlab serve: {err} (the workers' error is above); nothing is served.") from None
    shutil.rmtree(state_dir, ignore_errors=True)
    print("cnnlab serve: stopped", flush=True)
    return 0
