"""Per-epoch metrics reach MLflow in batches (tracking.EpochLog), against a real SQLite store."""

import mlflow
import pytest

from pipeline.tracking import EpochLog


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('epoch_log') / 'mlflow.db'}"  # created once: seconds


@pytest.fixture
def run(store):
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as active:
        yield active.info.run_id


def _row(epoch):
    return {"epoch": epoch, "train/loss": 1.0 / epoch, "val/accuracy": 0.5 + epoch / 100}


def _steps(run_id, key="train/loss"):
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_epochs_are_held_until_the_interval_passes_then_written_with_their_steps(run):
    with EpochLog(every_s=3600) as log_epoch:
        for epoch in (1, 2, 3):
            log_epoch(epoch, _row(epoch))
        assert _steps(run) == []  # nothing written yet: one batch at the end
    assert _steps(run) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert _steps(run, "val/accuracy") == [(1, 0.51), (2, 0.52), (3, 0.53)]
    assert "epoch" not in mlflow.MlflowClient().get_run(run).data.metrics


def test_with_no_interval_each_epoch_is_written_at_once(run):
    with EpochLog(every_s=0) as log_epoch:
        log_epoch(1, _row(1))
        assert _steps(run) == [(1, 1.0)]
        log_epoch(2, _row(2))
        assert _steps(run) == [(1, 1.0), (2, 0.5)]


def test_a_failing_training_still_gets_the_epochs_it_finished(run):
    with pytest.raises(RuntimeError, match="diverged"):
        with EpochLog(every_s=3600) as log_epoch:
            log_epoch(1, _row(1))
            log_epoch(2, _row(2))
            raise RuntimeError("diverged in epoch 3")
    assert [step for step, _ in _steps(run)] == [1, 2]


def test_a_batch_never_exceeds_mlflows_limit_of_metrics(run, monkeypatch):
    monkeypatch.setattr(EpochLog, "MAX_PENDING", 5)  # two metrics per row: at most two rows per batch
    batches = []
    original = mlflow.MlflowClient.log_batch
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch",
                        lambda self, run_id, metrics, **kw: (batches.append(len(metrics)),
                                                             original(self, run_id, metrics=metrics, **kw)))
    with EpochLog(every_s=3600) as log_epoch:
        for epoch in range(1, 6):
            log_epoch(epoch, _row(epoch))
    assert max(batches) <= 5 and sum(batches) == 10
    assert [step for step, _ in _steps(run)] == [1, 2, 3, 4, 5]
