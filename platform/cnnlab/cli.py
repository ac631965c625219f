"""The `cnnlab` command. Heavy libraries load inside each command, so `cnnlab --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing

from cnnlab import UserError, __version__, did_you_mean

RECIPE_COMMANDS = {
    "fit": "train a recipe, then test its best checkpoint (one MLflow run)",
    "validate": "validate a checkpoint on the recipe's val split",
    "test": "test a checkpoint on the recipe's test split",
    "predict": "classify a recipe's test split with a checkpoint (--ckpt_path)",
}


def zoo(search: str | None = None) -> int:
    """List the architectures: params, GFLOPs, input size, paper top-1.

    Args:
        search: list the timm model names matching a pattern instead, e.g. 'vgg*'
    """
    import json
    from importlib.resources import files

    if search:
        import timm

        print("\n".join(timm.list_models(search)) or f"no timm model matches {search!r}")
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


def ui(
    host: str = "127.0.0.1",
    port: int = 5000,
    backend_store_uri: str | None = None,
    experiment: str = "cnnlab",
    open: bool = False,
) -> int:
    """Open the MLflow UI on the project's store (mlruns/ or MLFLOW_TRACKING_URI), at the experiment's runs.

    Args:
        host: bind address (this machine only by default)
        port: the UI's port
        backend_store_uri: another store than the project's
        experiment: the experiment whose runs table the printed link opens
        open: open the link in a browser once the UI answers
    """
    import socket
    import subprocess
    import time
    import webbrowser

    from cnnlab import store

    uri = backend_store_uri or store.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI points at an MLflow server ({uri}): open that address in a browser.")
    # The runs page itself: MLflow's home page and an experiment's default tab depend on what the browser
    # remembers (a fresh profile lands on the GenAI overview, mlflow/mlflow#24498).
    found = store.client(uri).get_experiment_by_name(experiment)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where this machine reaches the UI
    address = f"http://{local}:{port}"
    link = f"{address}/#/experiments/{found.experiment_id}/runs" if found else f"{address}/"
    where = f"the runs of experiment {experiment}" if found else f"no experiment {experiment} yet"
    print(f"MLflow UI for {uri}: {where} at {link} (Ctrl-C stops it)", flush=True)
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    )
    if open:
        deadline = time.time() + 60
        while ui.poll() is None and time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex((local, port)) == 0:
                    webbrowser.open(link)
                    break
            time.sleep(0.5)
    try:
        return ui.wait()
    except KeyboardInterrupt:
        ui.terminate()
        return ui.wait()


# name: (where it lives, one line for `cnnlab --help`). Each command's flags come from its function's signature and
# docstring (see `parser_for`), so a default or a choice is written once, where the function takes it.
COMMANDS = {
    "zoo": ("cnnlab.cli:zoo", "list the architectures: params, GFLOPs, input size, paper top-1"),
    "data check": ("cnnlab.datacheck:report", "report unreadable, truncated, non-image, odd-mode and oversized images"),
    "data audit": (
        "cnnlab.audit:audit",
        "find probably mislabelled images (cleanlab) from cross-validation fits or a model",
    ),
    "data preview": ("cnnlab.datacheck:preview_recipe", "write a PNG grid of augmented training samples of a recipe"),
    "register": ("cnnlab.registry:register_run", "register a run's model as a new version (alias challenger)"),
    "promote": ("cnnlab.registry:promote", "move the `champion` alias to a version, if it beats the champion"),
    "reproduce": (
        "cnnlab.reproduce:reproduce",
        "train a registered version again from its record, compare its metrics",
    ),
    "models": ("cnnlab.registry:models_table", "list registered models, versions, aliases and key metrics"),
    "tune": ("cnnlab.tune:tune", "an Optuna study over a recipe: pruned trials, workers, MLflow nesting"),
    "export": ("cnnlab.export:export", "export a model to ONNX or OpenVINO (fp32 or int8) or TorchScript, checked"),
    "compress report": ("cnnlab.compress:report", "params, size, CPU latency, top-1 and drop per variant of a model"),
    "serve": ("cnnlab.serve:serve", "a prediction service (LitServe): batching, alias hot swap, hardening"),
    "compare": ("cnnlab.compare:compare", "train recipes under one budget and compare them (nested MLflow runs)"),
    "ui": ("cnnlab.cli:ui", "open the MLflow UI on the project's store (mlruns/ or MLFLOW_TRACKING_URI)"),
    "predict": ("cnnlab.predict:predict", "classify images with a model: cnnlab predict MODEL_URI PATH ..."),
    "explain": (
        "cnnlab.explain:explain",
        "class-activation maps of a model's answers: cnnlab explain MODEL_URI PATH ...",
    ),
}
# Parameters spelled otherwise on the command line than in the signature, and the positional ones' names.
FLAGS = {"fmt": ["--format"], "recipe": ["--config"], "n": ["-n"], "output": ["--output", "-o"], "overrides": ["--set"]}
METAVARS = {"uri": "MODEL_URI", "uris": "MODEL_URI", "model": "MODEL_URI", "paths": "PATH"}


def arg_help(doc: str) -> dict[str, str]:
    """The `Args:` section of a Google-style docstring: {parameter: its text}."""
    helps, name, inside = {}, None, False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            inside = True
        elif inside and line.startswith("    ") and not line.startswith("        ") and ":" in line:
            name, _, text = line.strip().partition(":")
            helps[name] = text.strip()
        elif inside and line.startswith("        ") and name:
            helps[name] += " " + line.strip()
        elif inside and line.strip():
            inside = False
    return helps


class Parser(argparse.ArgumentParser):
    """A command's parser: a mistake in its flags is the user's, one line naming the flag (never a usage dump)."""

    def error(self, message: str):
        raise UserError(f"{self.prog.removeprefix('cnnlab ')}: {message}. `{self.prog} --help` lists its flags.")


def parser_for(command: str, function) -> argparse.ArgumentParser:
    """An argparse parser derived from a function: a parameter without a default (or before `/`) is positional, one
    with a default (or after `*`) is `--its-name`, with the docstring's help and the signature's default; bool is
    a switch, Literal gives the choices, list takes several values. A flag left out is not passed, so the
    function's default applies."""
    doc = inspect.getdoc(function) or ""
    helps, hints = arg_help(doc), typing.get_type_hints(function)
    parser = Parser(
        prog=f"cnnlab {command}",
        description=doc.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    for name, parameter in inspect.signature(function).parameters.items():
        kind = hints.get(name, str)
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(options) == 1:
            kind = options[0]  # X | None: an X, or left out
        spec = {"help": helps.get(name, "")}
        positional = parameter.kind is parameter.POSITIONAL_ONLY or (
            parameter.kind is parameter.POSITIONAL_OR_KEYWORD and parameter.default is parameter.empty
        )
        if typing.get_origin(kind) is typing.Literal:
            spec["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is list:  # several values: `A B C` (or repeated, for a flag)
            spec.update(nargs="*" if positional else "+", type=typing.get_args(kind)[0])
            spec.update({} if positional else {"action": "extend"})
        elif kind is bool:
            spec["action"] = "store_true"
        elif kind in (int, float):
            spec["type"] = kind
        if positional:  # one with a default (positional-only, before `/`) may be left out
            if parameter.default is not parameter.empty and "nargs" not in spec:
                spec["nargs"] = "?"
            parser.add_argument(name, metavar=METAVARS.get(name, name.upper()), **spec)
            continue
        if parameter.default is parameter.empty:  # keyword-only without a default: a required flag
            spec["required"] = True
        elif parameter.default not in (None, False, ()):
            spec["help"] += f" (default: {parameter.default})"
        parser.add_argument(*FLAGS.get(name, ["--" + name.replace("_", "-")]), dest=name, **spec)
    return parser


def run(command: str, argv: list[str]) -> int:
    """Parse a command's flags from its function's signature and call it with those given."""
    module, _, name = COMMANDS[command][0].partition(":")
    function = getattr(importlib.import_module(module), name)
    given = vars(parser_for(command, function).parse_args(argv))
    parameters = inspect.signature(function).parameters.values()
    first = [given.pop(p.name) for p in parameters if p.kind is p.POSITIONAL_ONLY and p.name in given]
    result = function(*first, **given)
    return result if isinstance(result, int) else 0


def usage() -> str:
    recipe = [f"  {name:<16} {text}" for name, text in RECIPE_COMMANDS.items()]
    return "\n".join(
        [
            "usage: cnnlab COMMAND ...",
            "",
            "Train, tune, track, compress and serve classic CNN image classifiers from one YAML recipe.",
            "",
            "recipe commands: cnnlab COMMAND --config RECIPE [--dotted.key=value ...] (LightningCLI)",
            *recipe,
            "",
            "commands (`cnnlab COMMAND --help` for each one's flags):",
            *(f"  {name:<16} {text}" for name, (_, text) in COMMANDS.items()),
            "",
            "options:",
            "  --version        print the version",
        ]
    )


def _message(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(err).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in ([], ["-h"], ["--help"]):
            print(usage())
            return 0
        if argv[0] == "--version":
            print(f"cnnlab {__version__}")
            return 0
        recipe = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
        if argv[0] in RECIPE_COMMANDS and (argv[0] != "predict" or recipe):
            from cnnlab.run import run_recipe

            run_recipe(argv)
            return 0
        for words in (2, 1):
            if " ".join(argv[:words]) in COMMANDS:
                return run(" ".join(argv[:words]), argv[words:])
        actions = [name for name in COMMANDS if name.startswith(argv[0] + " ")]
        if actions:
            raise UserError(f"cnnlab {argv[0]} needs an action: {', '.join(a.split()[1] for a in actions)}.")
        hint = did_you_mean(argv[0], [*RECIPE_COMMANDS, *(c.split()[0] for c in COMMANDS)])
        raise UserError(f"'{argv[0]}' is not a cnnlab command.{hint} `cnnlab --help` lists them.")
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
