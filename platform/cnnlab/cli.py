"""The `cnnlab` command. Heavy libraries load inside each command, so `cnnlab --help` stays instant."""

from __future__ import annotations

import argparse
import sys

from cnnlab import UserError, __version__

RECIPE_COMMANDS = {
    "fit": "train a recipe, then test its best checkpoint (one MLflow run)",
    "validate": "validate a checkpoint on the recipe's val split",
    "test": "test a checkpoint on the recipe's test split",
    "predict": "classify images with a model (cnnlab predict MODEL_URI PATH ...), or a recipe's test split",
}


def _zoo(args) -> int:
    from cnnlab.models import zoo_table

    if args.search:
        import timm

        print("\n".join(timm.list_models(args.search)) or f"no timm model matches {args.search!r}")
        return 0
    print(f"{'model':<20} {'family':<20} {'params':>9} {'GFLOPs*':>8} {'input':>6} {'paper top-1':>11}  source")
    for row in zoo_table():
        top1 = f"{row['paper_top1']:.1f}%" if row["paper_top1"] else "-"
        print(
            f"{row['name']:<20} {row['family']:<20} {row['params'] / 1e6:>8.2f}M {row['gmacs']:>8.2f} "
            f"{row['input']:>6} {top1:>11}  {row['source']}"
        )
    print(
        "* multiply-adds of one forward pass at the native input size (the papers' convention), 1000 classes.\n"
        "Any timm model name works too: `cnnlab zoo --search 'resnet*'`."
    )
    return 0


def _data(args) -> int:
    from cnnlab import datacheck

    if args.action == "check":
        return datacheck.report(args.source, args.max_pixels)
    return datacheck.preview_recipe(args.config, args.out, args.n)


def _ui(args) -> int:
    import subprocess

    from cnnlab.store import default_tracking_uri

    uri = args.backend_store_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI points at an MLflow server ({uri}): open that address in a browser.")
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
    )


def _register(args) -> int:
    from cnnlab.registry import register

    version = register(args.run_id, args.name)
    print(
        f"registered {args.name} v{version.version} from run {args.run_id} (alias challenger); "
        f"promote it with `cnnlab promote {args.name}`"
    )
    return 0


def _promote(args) -> int:
    from cnnlab.registry import promote

    return promote(args.name, args.version, args.metric, args.min_delta, args.data, args.force)


def _models(args) -> int:
    from cnnlab.registry import models_table

    return models_table(args.name)


def _tune(args) -> int:
    from cnnlab import tune

    if args.show:
        return tune.show(args.show, args.storage)
    if not args.config or not args.space:
        raise UserError("cnnlab tune needs --config RECIPE and --space SPACE.yaml (or --show STUDY).")
    return tune.tune(
        args.config,
        args.space,
        n_trials=args.n_trials,
        timeout=args.timeout,
        study=args.study,
        storage=args.storage,
        workers=args.workers,
        sampler=args.sampler,
        pruner=args.pruner,
        metric=args.metric,
        direction=args.direction,
        seed=args.seed,
        heartbeat=args.heartbeat,
    )


def _export(args) -> int:
    from cnnlab.export import export

    export(
        args.model_uri,
        args.out,
        fmt=args.format,
        int8=args.int8,
        data=args.data,
        calib_batches=args.calib_batches,
        register=args.register,
    )
    return 0


def _compress(args) -> int:
    from cnnlab.compress import report

    report(args.model_uris, args.threads, args.runs, args.data)
    return 0


def _serve(args) -> int:
    from cnnlab.serve import serve

    return serve(
        args.model_uri,
        device=args.device,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        workers=args.workers,
        host=args.host,
        port=args.port,
        follow_alias=args.follow_alias,
        poll_seconds=args.poll_seconds,
        api_key_env=args.api_key_env,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        threads=args.threads,
        max_images=args.max_images,
        max_inflight_bytes=args.max_inflight_bytes,
        max_decode_seconds=args.max_decode_seconds,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
    )


def _compare(args) -> int:
    import yaml

    from cnnlab.compare import compare

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: write it as dotted.key=value, e.g. trainer.limit_train_batches=20")
        overrides[key] = yaml.safe_load(value)
    return compare(args.recipes, args.max_epochs, args.name, args.runs, args.docs, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Train, tune, track, compress and serve classic CNN image classifiers from one YAML recipe.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in RECIPE_COMMANDS.items():
        commands.add_parser(
            name,
            help=text if name == "predict" else f"{text}: cnnlab {name} --config RECIPE [--dotted.key=value ...]",
            add_help=False,
        )

    zoo = commands.add_parser("zoo", help="list the architectures: params, GFLOPs, input size, paper top-1")
    zoo.add_argument("--search", metavar="PATTERN", help="list timm model names matching a pattern, e.g. 'vgg*'")
    zoo.set_defaults(func=_zoo)

    data = commands.add_parser("data", help="check a data source, or preview a recipe's augmentation")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="report unreadable, truncated, non-image, odd-mode and oversized images")
    check.add_argument("source", help="ImageFolder root, CSV manifest, WebDataset shard folder, digits or synthetic")
    check.add_argument("--max-pixels", type=int, default=89_478_485, help="pixel limit per image (default: PIL's)")
    preview = actions.add_parser("preview", help="write a PNG grid of augmented training samples of a recipe")
    preview.add_argument("--config", required=True, help="the recipe YAML")
    preview.add_argument("--out", default="preview.png", help="where to write the PNG (default: preview.png)")
    preview.add_argument("-n", type=int, default=32, help="how many samples (default: 32)")
    data.set_defaults(func=_data)

    register = commands.add_parser("register", help="register a run's model as a new version (alias challenger)")
    register.add_argument("run_id", help="the MLflow run id of a finished fit")
    register.add_argument("--name", required=True, help="the registered model's name")
    register.set_defaults(func=_register)

    promote = commands.add_parser("promote", help="move the `champion` alias to a version, if it beats the champion")
    promote.add_argument("name", help="the registered model's name")
    promote.add_argument("--version", help="the candidate (default: the `challenger` alias, else the latest)")
    promote.add_argument("--metric", default="test/acc", help="test/acc, test/top5, test/f1 or test/loss")
    promote.add_argument("--min-delta", type=float, default=0.0, help="how much better the candidate must be")
    promote.add_argument("--data", help="evaluate on this source's test split (default: the data the model records)")
    promote.add_argument("--force", action="store_true", help="promote even if worse (recorded); also for rollback")
    promote.set_defaults(func=_promote)

    models = commands.add_parser("models", help="list registered models, versions, aliases and key metrics")
    models.add_argument("name", nargs="?", help="one model only")
    models.set_defaults(func=_models)

    tune = commands.add_parser("tune", help="an Optuna study over a recipe: pruned trials, workers, MLflow nesting")
    tune.add_argument("--config", help="the recipe to tune")
    tune.add_argument("--space", help="YAML: dotted recipe keys to distributions (see recipes/spaces/)")
    tune.add_argument("--n-trials", type=int, help="trials to run in this invocation (all workers together)")
    tune.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    tune.add_argument("--study", help="study name (default: RECIPE-SPACE); an existing study resumes")
    tune.add_argument("--storage", help="any SQLAlchemy URL (default: sqlite:///mlruns/optuna.db)")
    tune.add_argument("--workers", type=int, default=1, help="trials run at once on this machine")
    tune.add_argument("--sampler", default="tpe", choices=["tpe", "random", "cmaes", "qmc", "grid"])
    tune.add_argument("--pruner", default="median", choices=["median", "hyperband", "successive_halving", "none"])
    tune.add_argument("--metric", default="val/acc", help="the validation metric to optimize (default: val/acc)")
    tune.add_argument("--direction", default="maximize", choices=["maximize", "minimize"])
    tune.add_argument("--seed", type=int, help="sampler seed")
    tune.add_argument(
        "--heartbeat",
        type=float,
        default=60,
        help="seconds between a running trial's heartbeats; "
        "trials of a killed study that miss two are failed when it resumes (default: 60)",
    )
    tune.add_argument("--show", metavar="STUDY", help="print a study's leaderboard and exit")
    tune.set_defaults(func=_tune)

    export = commands.add_parser(
        "export", help="export a model to ONNX (fp32 or int8) or TorchScript, with parity checks"
    )
    export.add_argument(
        "model_uri",
        help="models:/NAME@ALIAS, models:/NAME/V, a run id or runs:/RUN_ID, a logged-model id (m-...), or a .ckpt",
    )
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    export.add_argument("--int8", action="store_true", help="static int8 quantization (ONNX Runtime, QOperator)")
    export.add_argument(
        "--data",
        help="labelled images (ImageFolder, CSV, shards): int8 calibrates on its training "
        "split and parity is checked on its test split (default for int8: the data the model records)",
    )
    export.add_argument("--calib-batches", type=int, default=10, help="training batches (of 32) to calibrate on")
    export.add_argument("--register", metavar="NAME", help="register the ONNX file as a new version of NAME")
    export.set_defaults(func=_export)

    compress = commands.add_parser("compress", help="compare compressed variants of a model")
    compress_actions = compress.add_subparsers(dest="action", metavar="ACTION", required=True)
    compress_report = compress_actions.add_parser(
        "report", help="params, size, CPU latency, top-1 and drop per variant"
    )
    compress_report.add_argument(
        "model_uris",
        nargs="+",
        help="the baseline first, then variants: model URIs, checkpoints or `cnnlab export` folders",
    )
    compress_report.add_argument("--threads", type=int, default=2, help="CPU threads for the latency (default: 2)")
    compress_report.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (a quarter at 32)")
    compress_report.add_argument(
        "--data", help="evaluate on this source's test split (default: the data the first model records)"
    )
    compress_report.set_defaults(func=_compress)

    serve = commands.add_parser("serve", help="a prediction service (LitServe): batching, alias hot swap, hardening")
    serve.add_argument(
        "model_uri",
        help="models:/NAME@ALIAS, models:/NAME/V, a run, a logged-model id, a .ckpt or a "
        "`cnnlab export` folder; served on the runtime its artifact holds",
    )
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    serve.add_argument("--max-batch-size", type=int, default=32, help="concurrent requests stacked into one call")
    serve.add_argument("--batch-timeout-ms", type=float, default=5.0, help="how long a batch waits to fill")
    serve.add_argument("--workers", type=int, default=1, help="model worker processes")
    serve.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--follow-alias", action="store_true", help="poll the registry and swap when the alias moves")
    serve.add_argument("--poll-seconds", type=float, default=5.0, help="how often --follow-alias polls")
    serve.add_argument(
        "--api-key-env", metavar="VAR", help="require the key in this environment variable (401 without)"
    )
    serve.add_argument("--max-body-bytes", type=int, default=10_000_000, help="larger bodies get 413")
    serve.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="a request whose images together are larger gets 413"
    )
    serve.add_argument("--max-images", type=int, default=64, help="more images in one request get 413")
    serve.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=200_000_000,
        help="request bodies held at once, all together; beyond it new requests get 503",
    )
    serve.add_argument(
        "--max-decode-seconds", type=float, default=5.0, help="decoding one request's images beyond this gets 413"
    )
    serve.add_argument("--body-timeout", type=float, default=30.0, help="seconds a body may pause before 408")
    serve.add_argument(
        "--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays open"
    )
    serve.set_defaults(func=_serve)

    compare = commands.add_parser(
        "compare", help="train recipes under one budget and compare them (nested MLflow runs)"
    )
    compare.add_argument("recipes", nargs="*", help="recipes and/or study files (recipes/studies/)")
    compare.add_argument("--max-epochs", type=int, help="the same epoch budget for every recipe")
    compare.add_argument("--name", help="the comparison's name (default: the study's)")
    compare.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a dotted recipe key for every run, e.g. --set trainer.limit_train_batches=20",
    )
    compare.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN_ID",
        help="compare finished runs instead of training (a former comparison's parent run stands for its children)",
    )
    compare.add_argument(
        "--docs",
        metavar="PATH",
        help="write the measured table into this markdown file's measured block (e.g. docs/architectures.md)",
    )
    compare.set_defaults(func=_compare)

    ui = commands.add_parser("ui", help="open the MLflow UI on the project's store (mlruns/ or MLFLOW_TRACKING_URI)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--backend-store-uri", help="another store than the project's")
    ui.set_defaults(func=_ui)
    return parser


def _message(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(err).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["predict"] and not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
            from cnnlab import predict

            return predict.main(argv[1:])
        if argv and argv[0] in RECIPE_COMMANDS:
            from cnnlab.run import run_recipe

            run_recipe(argv)
            return 0
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 0
        return args.func(args)
    except UserError as err:
        print(f"cnnlab: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
