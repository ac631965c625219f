"""The command line: every recipe runs, typos are explained, `--help` stays light."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from cnnlab import UserError
from cnnlab.cli import main
from conftest import QUICKSTART, ROOT

RECIPES = sorted(
    p
    for p in (ROOT / "recipes").rglob("*.yaml")
    if p.parent.name not in ("augment", "spaces", "tuned") and "recipes" not in (yaml.safe_load(p.read_text()) or {})
)  # study files list recipes
TINY = [
    "--data.source=synthetic",
    "--data.synthetic_size=20",
    "--data.val_fraction=0.5",
    "--data.test_fraction=0",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--trainer.fast_dev_run=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 32 px checkpoint to stand in for the registered teacher of the distillation recipes."""
    import os

    folder = tmp_path_factory.mktemp("teacher")
    old = os.getcwd()
    os.chdir(folder)
    try:
        assert (
            main(
                [
                    "fit",
                    "--model.model=resnet18",
                    "--model.small_input=true",
                    "--data.source=synthetic",
                    "--data.synthetic_size=40",
                    "--data.image_size=32",
                    "--data.batch_size=4",
                    "--data.num_workers=0",
                    "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=1",
                    "--trainer.accelerator=cpu",
                    "--test_after_fit=false",
                    "--log_model=false",
                    "--trainer.enable_progress_bar=false",
                ]
            )
            == 0
        )
    finally:
        os.chdir(old)
    return next(folder.glob("mlruns/*/*/checkpoints/best.ckpt"))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Stand-ins for the weights a fine-tuning recipe starts from (hub or registry): untrained, same shapes."""
    import torch

    from cnnlab.models import create_model

    def write(name: str, small_input: bool) -> Path:
        path = tmp_path_factory.getbasetemp() / f"{name}-{small_input}.pth"
        if not path.exists():
            torch.save(create_model(name, small_input=small_input).state_dict(), path)
        return path

    return write


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
@pytest.mark.slow
def test_every_recipe_instantiates_and_runs_a_step(recipe, workdir, request):
    extra = []
    model = yaml.safe_load(recipe.read_text())["model"]
    if model.get("pretrained"):
        weights = request.getfixturevalue("weights_file")(model["model"], model.get("small_input", False))
        extra.append(f"--model.pretrained={weights}")
    callbacks = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("callbacks") or []
    if any(c["class_path"].endswith("Distillation") for c in callbacks):
        teacher = str(request.getfixturevalue("teacher"))
        for c in callbacks:
            if c["class_path"].endswith("Distillation"):
                c["init_args"]["teacher"] = teacher
        extra.append(f"--trainer.callbacks={json.dumps(callbacks)}")
    assert main(["fit", "--config", str(recipe), *TINY, *extra]) == 0
    assert not list(workdir.rglob("*.ckpt")), "fast_dev_run writes no checkpoint"


def test_every_recipe_header_says_how_to_run_it_and_what_to_expect():
    for recipe in RECIPES:
        header = recipe.read_text().split("\nseed_everything")[0]
        assert "cnnlab fit --config recipes/" in header and "Expect:" in header, recipe


@pytest.mark.parametrize("command, shows", [("--help", "usage: cnnlab"), ("zoo", "inception_resnet_v2")])
def test_help_and_the_zoo_do_not_import_the_heavy_libraries(command, shows):
    code = (
        f"import sys; from cnnlab.cli import main\ntry: main([{command!r}])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'mlflow', 'timm', 'albumentations') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shows in out and out.strip().endswith("[]")


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    out = capsys.readouterr().out
    assert "model: resnet18" in out and "class_path: cnnlab.schedules.OneCycle" in out


@pytest.mark.parametrize(
    "change, expected",
    [
        ("max_epochs: 8", "recipe key 'trainer.max_epoc' is not known. Did you mean 'trainer.max_epochs'"),
        (
            "pct_start: 0.25",
            "OneCycle has no argument 'pct_strat'. Did you mean 'pct_start'? It accepts: total_steps, max_lr",
        ),
        ("nesterov: true", "torch.optim.SGD has no argument 'nestrov'. Did you mean 'nesterov'?"),
        ("torch.optim.SGD", "torch.optim.SDG does not exist. Did you mean 'SGD'?"),
        ("augment: none", "recipe key 'data.augment'"),
        ("batch_size: 64", "recipe key 'data.batch_size': Expected a <class 'int'>"),
    ],
)
def test_recipe_typos_name_the_key_and_the_choices(change, expected, tmp_path, capsys):
    typo = {
        "max_epochs: 8": "max_epoc: 8",
        "pct_start: 0.25": "pct_strat: 0.25",
        "nesterov: true": "nestrov: true",
        "torch.optim.SGD": "torch.optim.SDG",
        "augment: none": "augment: [none]",
        "batch_size: 64": "batch_size: lots",
    }[change]
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(QUICKSTART.read_text().replace(change, typo))
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "usage:" not in err


@pytest.mark.slow
def test_bad_values_get_one_line_with_the_fix(workdir, capsys):
    assert main(["fit", "--config", str(QUICKSTART), "--model.model=resnet5"]) == 2
    assert "Did you mean 'resnet50'" in capsys.readouterr().err
    assert main(["fit", "--config", str(QUICKSTART), "--data.on_bad_image=sk"]) == 2
    assert "'error', 'skip'" in capsys.readouterr().err
    assert main(["fit", "--config", str(QUICKSTART), "--model.model=inception_v4", "--model.small_input=false"]) == 2
    assert "cannot take 16x16 inputs" in capsys.readouterr().err


def test_zoo_lists_every_classic_architecture(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in ("alexnet", "vgg16_bn", "googlenet", "resnet152", "densenet201", "inception_v4", "inception_resnet_v2"):
        assert f"\n{name} " in out
    assert "He et al. 2016" in out and "25.56M" in out


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "cnnlab"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("cnnlab ")


def sample(
    uri: str,
    paths: list[str] = (),
    /,
    *,
    out: str,
    fmt: Literal["a", "b"] = "a",
    int8: bool = False,
    runs: list[str] | None = None,
    threads: int | None = None,
) -> dict:
    """A command.

    Args:
        uri: the model
        paths: the files
        out: where to write
        fmt: which format
        int8: quantize
        runs: the runs
        threads: CPU threads
    """
    return {}


def test_a_commands_flags_come_from_its_signature_and_docstring():
    from cnnlab.cli import parser_for

    parser = parser_for("sample", sample)
    given = vars(
        parser.parse_args(["m", "p1", "p2", "--out", "o", "--format", "b", "--int8", "--runs", "r1", "--runs", "r2"])
    )
    assert given == {"uri": "m", "paths": ["p1", "p2"], "out": "o", "fmt": "b", "int8": True, "runs": ["r1", "r2"]}
    assert vars(parser.parse_args(["m", "--out", "o"])) == {"uri": "m", "out": "o"}  # the rest: the function's defaults
    text = parser.format_help()
    assert "the files" in text and "which format (default: a)" in text and "--threads THREADS" in text
    with pytest.raises(UserError, match="sample: argument --format: invalid choice: 'c'"):
        parser.parse_args(["m", "--out", "o", "--format", "c"])  # not a choice: one line, no usage dump


@pytest.mark.parametrize(
    "command", ["serve", "tune", "export", "promote", "compress report", "predict", "data preview"]
)
def test_every_command_shows_its_defaults_from_the_signature(command, capsys):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cnnlab {command}") and "(default: " in out


def test_a_mistyped_command_names_the_closest():
    from cnnlab.cli import main as cli

    assert cli(["promot"]) == 2
