"""`cnnlab compress report MODEL_URI ...`: the variants of a model side by side, measured on this machine.

Columns: params, file size, median CPU latency at batch 1 and 32, top-1 on the first model's test split,
and the drop against that first model (the baseline). The table is printed and logged to MLflow.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from cnnlab.export import batches, load_trained, predictor


def latency_ms(predict, image_size: int, batch: int, runs: int) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, image_size, image_size), dtype=np.uint8)
    for _ in range(3):
        predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def accuracy(predict, datamodule, split: str) -> float:
    correct = total = 0
    for images, labels in batches(datamodule, split):
        correct += int((predict(images.numpy()).argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return correct / total


def report(uris: list[str], threads: int = 2, runs: int = 20, data: str | None = None) -> list[dict]:
    from cnnlab.data import DataModule

    torch.set_num_threads(threads)
    _, datamodule, _ = load_trained(uris[0]) if not data else (None, None, None)
    if data:
        datamodule = DataModule(data, num_workers=0)
    split = "test" if "test" in datamodule.splits else "val"
    rows = []
    for uri in uris:
        predict, label, params, size, meta = predictor(uri, threads)
        size_px = meta["image_size"]
        rows.append({"variant": label, "params": params, "mb": size / 1e6,
                     "ms_b1": latency_ms(predict, size_px, 1, runs), "ms_b32": latency_ms(predict, size_px, 32,
                                                                                         max(3, runs // 4)),
                     "top1": accuracy(predict, datamodule, split)})
    for row in rows:
        row["drop"] = 100 * (rows[0]["top1"] - row["top1"])
        row["speedup_b1"] = rows[0]["ms_b1"] / row["ms_b1"]
    table = format_table(rows, threads, f"{datamodule.source} {split} ({len(datamodule.splits[split])} images)")
    print(table)
    _log(rows, table)
    return rows


def format_table(rows: list[dict], threads: int, data: str) -> str:
    lines = [f"CPU, {threads} threads; top-1 on {data}; drop in points against the first row",
             f"{'variant':<44} {'params':>10} {'MB':>7} {'ms b1':>8} {'ms b32':>8} {'x b1':>5} {'top-1':>7} {'drop':>6}"]
    for r in rows:
        lines.append(f"{r['variant'][:44]:<44} {r['params'] / 1e6:>9.2f}M {r['mb']:>7.1f} {r['ms_b1']:>8.2f} "
                     f"{r['ms_b32']:>8.1f} {r['speedup_b1']:>5.2f} {r['top1']:>7.4f} {r['drop']:>+6.2f}")
    return "\n".join(lines)


def _log(rows: list[dict], table: str) -> None:
    import mlflow

    from cnnlab.registry import _client

    _client()
    mlflow.set_experiment("cnnlab")
    with mlflow.start_run(run_name="compress-report", tags={"cnnlab.role": "compress-report"}):
        mlflow.log_text(table + "\n", "compress_report.txt")
        mlflow.log_dict(rows, "compress_report.json")
        for i, row in enumerate(rows):
            mlflow.log_metrics({f"variant{i}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
