"""`cnnlab tune --target RUNTIME`: accuracy and latency on the target together, the Pareto front registered."""

import optuna
import pytest
import yaml

from cnnlab.cli import main
from cnnlab.tune import open_storage
from conftest import cnnlab, mlflow_client

# two architectures at two widths: full, and an eighth of it (timm ResNet's stem_width and channels)
SPACE = {
    "model.model": {"type": "categorical", "choices": ["resnet18", "resnet34"]},
    "model.model_args": {"type": "categorical", "choices": [{}, {"stem_width": 8, "channels": [8, 16, 32, 64]}]},
}


@pytest.fixture
def recipe(small, workdir):
    """The small quick-start recipe (the full widths learn more than the narrow ones in its 3 short epochs)."""
    (workdir / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return small, workdir / "space.yaml"


@pytest.mark.slow
def test_a_latency_study_prints_plots_and_registers_its_pareto_front(recipe, workdir):
    config, space = recipe
    args = ["tune", "--config", config, "--space", space, "--sampler", "grid", "--study", "front"]
    result = cnnlab(*args, "--n-trials", 4, "--workers", 2, "--target", "onnx-int8", "--register", "digits-front",
                    "--latency-runs", 20, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pareto front of front:" in result.stdout and "[torch.onnx]" not in result.stdout

    study = optuna.load_study(study_name="front", storage=open_storage(f"sqlite:///{workdir}/mlruns/optuna.db"))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert {t.params["model.model"] for t in study.trials} == {"resnet18", "resnet34"}
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    assert len(front) >= 2, [t.values for t in study.trials]
    # a front: each faster trial is less accurate, and no trial beats a front trial on both
    assert all(a.values[0] < b.values[0] for a, b in zip(front, front[1:]))
    for t in front:
        assert not any(o.values[0] >= t.values[0] and o.values[1] < t.values[1] for o in study.trials)

    client = mlflow_client()
    versions = sorted(client.search_model_versions("name='digits-front'"), key=lambda v: int(v.version))
    assert len(versions) == len(front)
    for version, trial in zip(versions, front):  # fastest first
        assert version.run_id == trial.user_attrs["mlflow_run_id"]
        assert float(version.tags["tune.val/acc"]) == pytest.approx(trial.values[0], rel=1e-5)
        assert float(version.tags["tune.latency_ms"]) == pytest.approx(trial.values[1], rel=1e-3)
        assert version.tags["tune.target"] == "onnx-int8" and version.tags["tune.trial"] == str(trial.number)
    assert client.get_model_version_by_alias("digits-front", "challenger").version == versions[-1].version

    parent = client.get_run(study.user_attrs["mlflow_parent_run"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in logged
    assert client.download_artifacts(parent.info.run_id, "pareto_front.txt")
    table = cnnlab("models", "digits-front", cwd=workdir)
    assert table.returncode == 0 and table.stdout.count("ms onnx-int8") == len(front), table.stdout


def test_register_needs_a_target_and_says_how_else(recipe, workdir, capsys):
    config, space = recipe
    assert main(["tune", "--config", str(config), "--space", str(space), "--n-trials", "1", "--register", "x"]) == 2
    assert "--register NAME registers the Pareto front of a --target study" in capsys.readouterr().err
