"""`cnnlab serve`'s Prometheus metrics (GET /metrics), through prometheus_client's multiprocess mode: the API
server processes count requests, the worker processes count images and model calls, and one scrape adds them up.

Each process keeps its values in memory-mapped files of one folder (prometheus_client's way for forked and
spawned servers: a value changes in memory, no file is written per request). `start` names the folder before any
process imports prometheus_client; the families are made on first use in each process.
"""

from __future__ import annotations

import os
import re
from functools import cache

FOLDER = "PROMETHEUS_MULTIPROC_DIR"
SECONDS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# each path is counted under its route, so that names and versions in paths do not make new series
ENDPOINTS = [
    (re.compile(p), e)
    for p, e in [
        (r"^/v2/models/[^/]+/versions/[^/]+/infer$", "/v2/models/{name}/versions/{version}/infer"),
        (r"^/v2/models/[^/]+/infer$", "/v2/models/{name}/infer"),
        (r"^/v2/models/[^/]+/versions/[^/]+/ready$", "/v2/models/{name}/versions/{version}/ready"),
        (r"^/v2/models/[^/]+/ready$", "/v2/models/{name}/ready"),
        (r"^/v2/models/[^/]+/versions/[^/]+$", "/v2/models/{name}/versions/{version}"),
        (r"^/v2/models/[^/]+$", "/v2/models/{name}"),
        (r"^(/predict|/invocations|/ping|/health|/info|/metrics|/v2|/v2/health/live|/v2/health/ready|/)$", None),
    ]
]


def start(folder: str) -> None:
    """Keep every serving process's values in `folder` (call before any of them imports prometheus_client)."""
    import sys

    if "prometheus_client" in sys.modules and os.environ.get(FOLDER) != folder:
        raise RuntimeError("prometheus_client was imported before cnnlab.metrics.start: its values would not add up")
    os.makedirs(folder, exist_ok=True)
    os.environ[FOLDER] = folder


def endpoint(path: str) -> str:
    """The route a path belongs to (`other` for paths no route serves)."""
    for pattern, name in ENDPOINTS:
        if pattern.match(path):
            return name or path
    return "other"


@cache
def families():
    """This process's metric families (made once, after `start`)."""
    from types import SimpleNamespace

    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        requests=Counter("cnnlab_requests", "HTTP requests answered, by route and status", ["endpoint", "status"]),
        latency=Histogram(
            "cnnlab_request_seconds", "Time to answer a request, by route", ["endpoint"], buckets=SECONDS
        ),
        in_flight=Gauge("cnnlab_requests_in_flight", "Requests being answered now", multiprocess_mode="livesum"),
        in_flight_bytes=Gauge(
            "cnnlab_request_bytes_in_flight",
            "Request body bytes held now (--max-inflight-bytes)",
            multiprocess_mode="livesum",
        ),
        images=Counter("cnnlab_images", "Images through the model"),
        model_calls=Counter("cnnlab_model_calls", "Calls of the model (one per batch)"),
        batch=Histogram("cnnlab_batch_images", "Images per model call", buckets=BATCH),
        model=Gauge(
            "cnnlab_model_info",
            "The model a worker serves (1) or served before a swap (0)",
            ["name", "version", "alias", "runtime", "engine", "digest"],
            multiprocess_mode="liveall",
        ),
    )


def exposition() -> tuple[bytes, str]:
    """Every live process's metrics in Prometheus' text format, and its Content-Type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
