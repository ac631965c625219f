"""The store (the one module that speaks MLflow) and the one evaluator, without a fit."""

import numpy as np
import pytest

from cnnlab import UserError, store
from cnnlab.evaluate import agreement, scores


def test_sqlite_urls_are_made_absolute_and_others_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store.absolute_sqlite("sqlite:///a/b.db") == f"sqlite:///{tmp_path}/a/b.db"
    assert (tmp_path / "a").is_dir()
    assert store.absolute_sqlite("postgresql://u@h/db") == "postgresql://u@h/db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.default_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.mark.parametrize("ending, status", [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_run_ends_with_the_status_its_body_earned(workdir, ending, status):
    with pytest.raises(ending) if ending else _nothing():
        with store.run("probe", {"cnnlab.role": "test"}) as run:
            run.client.log_metric(run.id, "x", 1.0)
            if ending:
                raise ending("stop")
    finished = store.client().get_run(run.id)
    assert finished.info.status == status and finished.data.metrics["x"] == 1.0
    assert store.client().get_experiment(finished.info.experiment_id).name == "cnnlab"


def test_a_run_keeps_the_status_its_body_set_and_a_run_can_be_continued(workdir):
    with store.run("trial") as run:
        run.status = "KILLED"  # e.g. a pruned trial
    assert store.client().get_run(run.id).info.status == "KILLED"
    with store.run(run_id=run.id) as again:
        assert store.client().get_run(again.id).info.status == "RUNNING"
    assert store.client().get_run(run.id).info.status == "FINISHED"


def test_an_unknown_model_uri_is_one_line_naming_the_forms(workdir):
    with pytest.raises(UserError, match="is not a model in .* A model is a run id"):
        store.resolve("models:/nothing/1")
    with pytest.raises(UserError, match="no such file"):
        store.resolve("./missing.ckpt")


def test_scores_and_agreement_of_logits():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 2.0]], np.float32)
    labels = [0, 1, 2, 0]
    result = scores(logits, labels, 3)
    assert result["test/acc"] == pytest.approx(0.75) and result["test/top5"] == pytest.approx(1.0)
    assert 0 < result["test/loss"] < 2
    other = logits.copy()
    other[3] = [3.0, 0.0, 0.0]
    assert agreement(logits, other) == {"max_abs_diff": pytest.approx(3.0), "top1_agreement": pytest.approx(0.75)}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
