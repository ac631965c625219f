"""The `cnnlab` command. Heavy libraries load inside each command, so `cnnlab --help` stays instant."""

from __future__ import annotations

import argparse
import sys

from cnnlab import UserError, __version__

RECIPE_COMMANDS = {
    "fit": "train a recipe, then test its best checkpoint (one MLflow run)",
    "validate": "validate a checkpoint on the recipe's val split",
    "test": "test a checkpoint on the recipe's test split",
    "predict": "predict the recipe's test split and write predictions.csv",
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
        print(f"{row['name']:<20} {row['family']:<20} {row['params'] / 1e6:>8.2f}M {row['gmacs']:>8.2f} "
              f"{row['input']:>6} {top1:>11}  {row['source']}")
    print("* multiply-adds of one forward pass at the native input size (the papers' convention), 1000 classes.\n"
          "Any timm model name works too: `cnnlab zoo --search 'resnet*'`.")
    return 0


def _data(args) -> int:
    from cnnlab import datacheck

    if args.action == "check":
        return datacheck.report(args.source, args.max_pixels)
    return datacheck.preview_recipe(args.config, args.out, args.n)


def _ui(args) -> int:
    import subprocess

    from cnnlab.tracking import default_tracking_uri

    uri = args.backend_store_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI points at an MLflow server ({uri}): open that address in a browser.")
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                            "--host", args.host, "--port", str(args.port)])


def _register(args) -> int:
    from cnnlab.registry import register

    version = register(args.run_id, args.name)
    print(f"registered {args.name} v{version.version} from run {args.run_id} (alias challenger); "
          f"promote it with `cnnlab promote {args.name}`")
    return 0


def _promote(args) -> int:
    from cnnlab.registry import promote

    return promote(args.name, args.version, args.metric, args.min_delta, args.data, args.force)


def _models(args) -> int:
    from cnnlab.registry import models_table

    return models_table(args.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", description="Train, tune, track, compress and serve classic "
                                     "CNN image classifiers from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in RECIPE_COMMANDS.items():
        commands.add_parser(name, help=f"{text}: cnnlab {name} --config RECIPE [--dotted.key=value ...]",
                            add_help=False)

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
    promote.add_argument("--data", help="evaluate on this source's test split instead of the recipe's")
    promote.add_argument("--force", action="store_true", help="promote even if worse (recorded); also for rollback")
    promote.set_defaults(func=_promote)

    models = commands.add_parser("models", help="list registered models, versions, aliases and key metrics")
    models.add_argument("name", nargs="?", help="one model only")
    models.set_defaults(func=_models)

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
