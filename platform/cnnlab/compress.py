"""`cnnlab compress report MODEL_URI ...`: the variants of a model side by side, measured on this machine.

Each row is a model on the runtime its artifact holds (torch, ONNX Runtime fp32/int8, OpenVINO fp32/int8,
TorchScript). Columns: params, file size, median CPU latency at batch 1 and 32, top-1 on the first model's
test split, agreement of its top-1 answers with the first model's on the same images, and the drop against
that first model (the baseline). The table is printed and logged to MLflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cnnlab import UserError, load, store
from cnnlab.evaluate import agreement, latency_ms, logits, scores


def report(
    uris: list[str], threads: int = 2, runs: int = 20, data: str | None = None, all_runtimes: bool = False
) -> list[dict]:
    """Compare variants of a model: params, size, CPU latency, top-1 and drop, each from its artifact alone,
    timed and scored on the same labelled split.

    Args:
        uris: the baseline first, then variants: model URIs, checkpoints or `cnnlab export` folders
        threads: CPU threads for the latency
        runs: timed runs at batch 1 (a quarter of them at 32)
        data: evaluate on this source's test split (the data the first model records)
        all_runtimes: also convert the first (torch) model for every runtime installed: ONNX Runtime and
            OpenVINO, fp32 and int8
    """
    if not uris:
        raise UserError("cnnlab compress report needs a model URI: the baseline first, then its variants.")
    from cnnlab.data import labelled

    torch.set_num_threads(threads)
    # an export folder by its name
    variants = [(Path(uri).name if Path(uri).is_dir() else uri, load.model(uri, threads)) for uri in uris]
    datamodule, split = labelled(variants[0][1].meta, data)
    with tempfile.TemporaryDirectory(prefix="cnnlab-report-") as tmp:
        if all_runtimes:
            variants += converted(variants[0][1], datamodule.splits["train"], Path(tmp), threads)
        rows = time_and_score(variants, datamodule.splits[split], runs)
    table = format_table(rows, threads, f"{datamodule.source} {split} ({len(datamodule.splits[split])} images)")
    print(table)
    _log(rows, table)
    return rows


def converted(source, train, folder: Path, threads: int) -> list:
    """(label, network) of the source converted for every runtime installed here."""
    from cnnlab.cnnlab_model import load_network
    from cnnlab.export import convert, openvino_installed

    if source.runtime != "torch":
        raise UserError(
            f"--all-runtimes converts a torch model: '{source.source}' is {source.runtime}; put its source first."
        )
    formats = [("onnx", False), ("onnx", True)]
    if openvino_installed():
        formats += [("openvino", False), ("openvino", True)]
    else:
        print('cnnlab: OpenVINO is not installed (pip install "cnnlab[openvino]"): its rows are left out.')
    out = []
    if source.module is None:  # a fit's model runs its ONNX twin on the CPU: its program converts, and is a row
        source = load.model(source.source, threads, program=True)
        out.append(("-> its torch program", source))
    for fmt, int8 in formats:
        path = folder / str(len(out))
        meta = convert(source, path, fmt, int8, train)
        out.append((f"-> {meta['format']}", load_network(path, threads)))
    return out


def time_and_score(variants: list, samples, runs: int) -> list[dict]:
    """A row per (label, network): latency at batch 1 and 32, top-1 on `samples`, agreement with the first."""
    rows, first = [], None
    for label, network in variants:
        answers = logits(network, samples)
        first = answers if first is None else first
        size = network.image_size
        rows.append(
            {
                "variant": f"{label} ({network.meta.get('format')}, {network.engine})",
                "params": network.params,
                "mb": network.meta.get("bytes", 4 * network.params) / 1e6,
                "ms_b1": latency_ms(network.predict, size, 1, runs),
                "ms_b32": latency_ms(network.predict, size, 32, max(3, runs // 4)),
                "top1": scores(answers, samples.labels, len(network.classes))["test/acc"],
                "agreement": agreement(first, answers)["top1_agreement"],
            }
        )
    for row in rows:
        row["drop"] = 100 * (rows[0]["top1"] - row["top1"])
        row["speedup_b1"] = rows[0]["ms_b1"] / row["ms_b1"]
    return rows


def format_table(rows: list[dict], threads: int, data: str) -> str:
    width = max(len("variant"), *(len(r["variant"]) for r in rows))  # the whole name: a runtime is at its end
    lines = [
        f"CPU, {threads} threads; top-1 on {data}; drop in points against the first row",
        f"{'variant':<{width}} {'params':>10} {'MB':>7} {'ms b1':>8} {'ms b32':>8} {'x b1':>5} {'top-1':>7} {'agree':>7} "
        f"{'drop':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<{width}} {r['params'] / 1e6:>9.2f}M {r['mb']:>7.1f} {r['ms_b1']:>8.2f} "
            f"{r['ms_b32']:>8.1f} {r['speedup_b1']:>5.2f} {r['top1']:>7.4f} {r['agreement']:>7.4f} {r['drop']:>+6.2f}"
        )
    return "\n".join(lines)


def _log(rows: list[dict], table: str) -> None:
    with store.run("compress-report", {"cnnlab.role": "compress-report"}) as run:
        run.client.log_text(run.id, table + "\n", "compress_report.txt")
        run.client.log_dict(run.id, rows, "compress_report.json")
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    run.client.log_metric(run.id, f"variant{i}/{key}", value)
