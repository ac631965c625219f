"""Every user mistake once probed ends in one `cnnlab:` line that names the file, key or value and the fix, and
a non-zero exit: no traceback, no silent acceptance."""

import os

import pytest
import torch

from conftest import QUICKSTART, ROOT, cnnlab_here, make_image_folder

SPACE = ROOT / "recipes" / "spaces" / "quickstart.yaml"
FIT = ["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", "--data.num_workers=0", "--log_model=false"]
TUNE = ["tune", "--config", QUICKSTART, "--space", SPACE, "--n-trials", "1", "--storage"]

CASES = {  # name: (command, what the message must say); {ckpt} is a 10-class checkpoint, {here} the data folder
    "CSV row without a label, fit": (
        FIT + ["--data.source={here}/nolabel.csv"],
        "line 3: every row needs a path and a label",
    ),
    "CSV row without a label, data check": (["data", "check", "{here}/nolabel.csv"], "line 3: every row needs"),
    "CSV label that is empty": (FIT + ["--data.source={here}/emptylabel.csv"], "every row needs a path and a label"),
    "ImageFolder with one class": (FIT + ["--data.source={here}/one"], "has 1 class (cat): a classifier needs two"),
    "class name that cannot name a metric": (["data", "check", "{here}/oddname"], "cannot name a metric"),
    "--ckpt_path of random bytes": (FIT + ["--ckpt_path={here}/random.ckpt"], "is not a readable PyTorch checkpoint"),
    "--ckpt_path of an empty file": (FIT + ["--ckpt_path={here}/empty.ckpt"], "is not a readable PyTorch checkpoint"),
    "--ckpt_path missing": (FIT + ["--ckpt_path={here}/missing.ckpt"], "does not exist"),
    "--ckpt_path truncated": (FIT + ["--ckpt_path={here}/truncated.ckpt"], "is not a readable PyTorch checkpoint"),
    "10-class checkpoint tested on 2-class data": (
        ["test", "--config", QUICKSTART, "--data.source={here}/two", "--data.num_workers=0", "--ckpt_path={ckpt}"],
        "knows 10 classes",
    ),
    "serve a version that does not exist": (["serve", "models:/digits/99"], "'models:/digits/99' is not a model"),
    "serve a garbage .ckpt": (["serve", "{here}/random.ckpt"], "is not a readable PyTorch checkpoint"),
    "export a garbage .ckpt": (["export", "{here}/random.ckpt", "--out", "{here}/x"], "not a readable PyTorch"),
    "--storage notaurl": (TUNE + ["notaurl"], "--storage notaurl cannot be opened"),
    "--storage unreachable PostgreSQL": (TUNE + ["postgresql://u@127.0.0.1:1/x"], "cannot be opened"),
    "--storage unwritable sqlite": (TUNE + ["sqlite:////proc/no/optuna.db"], "cannot make its folder"),
    "--storage mysql without a driver": (TUNE + ["mysql://u@127.0.0.1/x"], "cannot be opened"),
    "prefix of a key (max_epoc)": (
        ["fit", "--config", QUICKSTART, "--trainer.max_epoc=3"],
        "'trainer.max_epoc' is not known. Did you mean 'trainer.max_epochs'",
    ),
    "missing --config file": (["fit", "--config", "{here}/nope.yaml"], "nope.yaml: no such file"),
    "serve a missing .ckpt": (["serve", "/missing.ckpt"], "'/missing.ckpt': no such file"),
    "promote --metric bogus": (["promote", "digits", "--metric", "bogus"], "--metric: invalid choice: 'bogus'"),
    "promote --max-class-drop 2": (["promote", "digits", "--max-class-drop", "2"], "give a recall drop from 0 to 1"),
    "predict --min-confidence 1.5": (
        ["predict", "{ckpt}", "{here}/two", "--min-confidence", "1.5"],
        "--min-confidence 1.5: give a probability from 0 to 1",
    ),
    "predict with both thresholds": (
        ["predict", "{ckpt}", "{here}/two", "--min-confidence", "0.5", "--target-precision", "0.9"],
        "both choose the threshold: give one",
    ),
    "serve --target-precision without a recorded curve": (
        ["serve", "{ckpt}", "--target-precision", "0.99"],
        "records no confidence curve (it was not calibrated): pass --min-confidence",
    ),
    "reproduce a .ckpt": (["reproduce", "{ckpt}"], "names no run to reproduce"),
}


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    here = tmp_path_factory.mktemp("mistakes")
    two = make_image_folder(here / "two")
    make_image_folder(here / "one", classes=("cat",))
    make_image_folder(here / "oddname", classes=("cat", "dog?"))
    (here / "nolabel.csv").write_text("path,label\ntwo/cat/0.png,cat\ntwo/dog/0.png\n")
    rows = [f"two/cat/{i}.png,cat" for i in range(6)] + [f'two/dog/{i}.png,""' for i in range(6)]
    (here / "emptylabel.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (here / "random.ckpt").write_bytes(os.urandom(4096))
    (here / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, here / "truncated.ckpt")
    (here / "truncated.ckpt").write_bytes((here / "truncated.ckpt").read_bytes()[:300])
    assert two.exists()
    return here


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_each_mistake_gets_one_line_that_says_the_fix(case, mistakes, quickstart):
    command, expected = CASES[case]
    cwd, _, run, _ = quickstart
    ckpt = next(cwd.glob(f"mlruns/*/{run.info.run_id}/checkpoints/best.ckpt"))
    args = [str(part).format(here=mistakes, ckpt=ckpt) for part in command]
    result = cnnlab_here(*args, cwd=mistakes)
    assert result.returncode != 0, (case, result.stdout[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("cnnlab: ") and expected in last, result.stderr[-2000:]
