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
    import json
    from importlib.resources import files

    if args.search:
        import timm

        print("\n".join(timm.list_models(args.search)) or f"no timm model matches {args.search!r}")
        return 0
    print(f"{'model':<20} {'family':<20} {'params':>9} {'GFLOPs*':>8} {'input':>6} {'paper top-1':>11}  source")
    for row in json.loads((files("cnnlab") / "presets" / "zoo.json").read_text()):  # as models.zoo_table() computes
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


def call(target: str):
    """A command that calls `module:function` with the flags given as keywords: a flag left out is not passed, so
    its default lives in the function's signature alone. The module loads only when the command runs."""

    def run(args) -> int:
        import importlib

        module, _, name = target.partition(":")
        given = {k: v for k, v in vars(args).items() if k not in ("command", "action", "func")}
        result = getattr(importlib.import_module(module), name)(**given)
        return result if isinstance(result, int) else 0

    return run


def ui(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None) -> int:
    """`cnnlab ui`: MLflow's UI on the project's store."""
    import subprocess

    from cnnlab.store import default_tracking_uri

    uri = backend_store_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI points at an MLflow server ({uri}): open that address in a browser.")
    print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    )


def _tune(args) -> int:
    if getattr(args, "show", None):
        from cnnlab.tune import show

        return show(args.show, getattr(args, "storage", None))
    if not getattr(args, "config", None) or not getattr(args, "space", None):
        raise UserError("cnnlab tune needs --config RECIPE and --space SPACE.yaml (or --show STUDY).")
    return call("cnnlab.tune:tune")(args)


def _compare(args) -> int:
    import yaml

    overrides = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: write it as dotted.key=value, e.g. trainer.limit_train_batches=20")
        overrides[key] = yaml.safe_load(value)
    given = {k: v for k, v in vars(args).items() if k != "set"}
    return call("cnnlab.compare:compare")(argparse.Namespace(**given, overrides=overrides))


def _register(args) -> int:
    from cnnlab.registry import register

    version = register(args.run_id, args.name)
    print(
        f"registered {args.name} v{version.version} from run {args.run_id} (alias challenger); "
        f"promote it with `cnnlab promote {args.name}`"
    )
    return 0


class Parser(argparse.ArgumentParser):
    """Options left out are left out of the namespace (no default here): the called function's default applies."""

    def __init__(self, **kwargs):
        super().__init__(argument_default=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Train, tune, track, compress and serve classic CNN image classifiers from one YAML recipe.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, text in RECIPE_COMMANDS.items():
        commands.add_parser(
            name,
            help=text if name == "predict" else f"{text}: cnnlab {name} --config RECIPE [--dotted.key=value ...]",
            add_help=False,
        )

    zoo = commands.add_parser("zoo", help="list the architectures: params, GFLOPs, input size, paper top-1")
    zoo.add_argument(
        "--search", default=None, metavar="PATTERN", help="list timm model names matching a pattern, e.g. 'vgg*'"
    )
    zoo.set_defaults(func=_zoo)

    data = commands.add_parser("data", help="check a data source, or preview a recipe's augmentation")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="report unreadable, truncated, non-image, odd-mode and oversized images")
    check.add_argument(
        "source",
        help="ImageFolder root, CSV manifest, WebDataset shards (folder, URL, brace pattern), digits or synthetic",
    )
    check.add_argument("--max-pixels", type=int, help="pixel limit per image (default: PIL's)")
    check.set_defaults(func=call("cnnlab.datacheck:report"))
    preview = actions.add_parser("preview", help="write a PNG grid of augmented training samples of a recipe")
    preview.add_argument("--config", dest="recipe", required=True, help="the recipe YAML")
    preview.add_argument("--out", help="where to write the PNG (default: preview.png)")
    preview.add_argument("-n", type=int, help="how many samples (default: 32)")
    preview.set_defaults(func=call("cnnlab.datacheck:preview_recipe"))

    register = commands.add_parser("register", help="register a run's model as a new version (alias challenger)")
    register.add_argument("run_id", help="the MLflow run id of a finished fit")
    register.add_argument("--name", required=True, help="the registered model's name")
    register.set_defaults(func=_register)

    promote = commands.add_parser("promote", help="move the `champion` alias to a version, if it beats the champion")
    promote.add_argument("name", help="the registered model's name")
    promote.add_argument("--version", help="the candidate (default: the `challenger` alias, else the latest)")
    promote.add_argument("--metric", help="test/acc (default), test/top5, test/f1 or test/loss")
    promote.add_argument("--min-delta", type=float, help="how much better the candidate must be (default: 0)")
    promote.add_argument("--data", help="evaluate on this source's test split (default: the data the model records)")
    promote.add_argument("--force", action="store_true", help="promote even if worse (recorded); also for rollback")
    promote.set_defaults(func=call("cnnlab.registry:promote"))

    models = commands.add_parser("models", help="list registered models, versions, aliases and key metrics")
    models.add_argument("name", nargs="?", help="one model only")
    models.set_defaults(func=call("cnnlab.registry:models_table"))

    tune = commands.add_parser("tune", help="an Optuna study over a recipe: pruned trials, workers, MLflow nesting")
    tune.add_argument("--config", help="the recipe to tune")
    tune.add_argument("--space", help="YAML: dotted recipe keys to distributions (see recipes/spaces/)")
    tune.add_argument("--n-trials", type=int, help="trials to run in this invocation (all workers together)")
    tune.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    tune.add_argument("--study", help="study name (default: RECIPE-SPACE); an existing study resumes")
    tune.add_argument("--storage", help="any SQLAlchemy URL (default: sqlite:///mlruns/optuna.db)")
    tune.add_argument("--workers", type=int, help="trials run at once on this machine (default: 1)")
    tune.add_argument("--sampler", help="tpe (default), random, cmaes, qmc or grid")
    tune.add_argument("--pruner", help="median (default), hyperband, successive_halving or none")
    tune.add_argument("--metric", help="the validation metric to optimize (default: val/acc)")
    tune.add_argument("--direction", help="maximize (default) or minimize")
    tune.add_argument("--seed", type=int, help="sampler seed")
    tune.add_argument(
        "--heartbeat",
        type=float,
        help="seconds between a running trial's heartbeats; "
        "trials of a killed study that miss two are failed when it resumes (default: 60)",
    )
    tune.add_argument("--show", metavar="STUDY", help="print a study's leaderboard and exit")
    tune.set_defaults(func=_tune)

    export = commands.add_parser(
        "export", help="export a model to ONNX or OpenVINO (fp32 or int8) or TorchScript, with parity checks"
    )
    export.add_argument(
        "uri",
        metavar="MODEL_URI",
        help="models:/NAME@ALIAS, models:/NAME/V, a run id or runs:/RUN_ID, a logged-model id (m-...), or a .ckpt",
    )
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", dest="fmt", help="onnx (default), openvino or torchscript")
    export.add_argument(
        "--int8", action="store_true", help="static int8 quantization (ONNX Runtime QOperator; OpenVINO: NNCF)"
    )
    export.add_argument(
        "--data",
        help="labelled images (ImageFolder, CSV, shards): int8 calibrates on its training "
        "split and parity is checked on its test split (default for int8: the data the model records)",
    )
    export.add_argument("--calib-batches", type=int, help="training batches (of 32) to calibrate on (default: 10)")
    export.add_argument("--register", metavar="NAME", help="register the export as a new version of NAME")
    export.set_defaults(func=call("cnnlab.export:export"))

    compress = commands.add_parser("compress", help="compare compressed variants of a model")
    compress_actions = compress.add_subparsers(dest="action", metavar="ACTION", required=True)
    compress_report = compress_actions.add_parser(
        "report", help="params, size, CPU latency, top-1 and drop per variant"
    )
    compress_report.add_argument(
        "uris",
        metavar="MODEL_URI",
        nargs="+",
        help="the baseline first, then variants: model URIs, checkpoints or `cnnlab export` folders",
    )
    compress_report.add_argument("--threads", type=int, help="CPU threads for the latency (default: 2)")
    compress_report.add_argument("--runs", type=int, help="timed runs at batch 1, a quarter at 32 (default: 20)")
    compress_report.add_argument(
        "--data", help="evaluate on this source's test split (default: the data the first model records)"
    )
    compress_report.add_argument(
        "--all-runtimes",
        action="store_true",
        help="also convert the first (torch) model for every runtime installed: ONNX Runtime and OpenVINO, fp32 and int8",
    )
    compress_report.set_defaults(func=call("cnnlab.compress:report"))

    serve = commands.add_parser("serve", help="a prediction service (LitServe): batching, alias hot swap, hardening")
    serve.add_argument(
        "uri",
        metavar="MODEL_URI",
        help="models:/NAME@ALIAS, models:/NAME/V, a run, a logged-model id, a .ckpt or a "
        "`cnnlab export` folder; served on the runtime its artifact holds",
    )
    serve.add_argument("--device", help="cpu (default) or cuda[:N] (torch; ONNX on onnxruntime-gpu's providers)")
    serve.add_argument("--runtime", help="run an ONNX model on openvino (or onnxruntime); default: the artifact's own")
    serve.add_argument("--max-batch-size", type=int, help="concurrent requests stacked into one call (default: 32)")
    serve.add_argument("--batch-timeout-ms", type=float, help="how long a batch waits to fill (default: 5)")
    serve.add_argument("--workers", type=int, help="model worker processes (default: 1)")
    serve.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    serve.add_argument("--host", help="bind address (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, help="(default: 8000)")
    serve.add_argument("--follow-alias", action="store_true", help="poll the registry and swap when the alias moves")
    serve.add_argument("--poll-seconds", type=float, help="how often --follow-alias polls (default: 5)")
    serve.add_argument(
        "--api-key-env", metavar="VAR", help="require the key in this environment variable (401 without)"
    )
    serve.add_argument("--max-body-bytes", type=int, help="larger bodies get 413 (default: 10 MB)")
    serve.add_argument("--max-pixels", type=int, help="a request whose images together are larger gets 413 (40 M)")
    serve.add_argument("--max-images", type=int, help="more images in one request get 413 (default: 64)")
    serve.add_argument(
        "--max-inflight-bytes", type=int, help="request bodies held at once, all together; beyond, 503 (200 MB)"
    )
    serve.add_argument("--max-decode-seconds", type=float, help="decoding one request beyond this gets 413 (5 s)")
    serve.add_argument("--body-timeout", type=float, help="seconds a body may pause before 408 (default: 30)")
    serve.add_argument("--idle-timeout", type=float, help="seconds an idle keep-alive connection stays open (5)")
    serve.set_defaults(func=call("cnnlab.serve:serve"))

    compare = commands.add_parser(
        "compare", help="train recipes under one budget and compare them (nested MLflow runs)"
    )
    compare.add_argument(
        "paths", metavar="RECIPE", nargs="*", default=[], help="recipes and/or study files (recipes/studies/)"
    )
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

    mlflow_ui = commands.add_parser(
        "ui", help="open the MLflow UI on the project's store (mlruns/ or MLFLOW_TRACKING_URI)"
    )
    mlflow_ui.add_argument("--host", help="bind address (default: 127.0.0.1, this machine only)")
    mlflow_ui.add_argument("--port", type=int, help="(default: 5000)")
    mlflow_ui.add_argument("--backend-store-uri", help="another store than the project's")
    mlflow_ui.set_defaults(func=call("cnnlab.cli:ui"))
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
    except BrokenPipeError:  # the reader went away (`cnnlab zoo | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
