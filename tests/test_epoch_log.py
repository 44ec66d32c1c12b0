"""Per-epoch metrics reach MLflow in batches (tracking.epoch_log.EpochLog), against a real SQLite store."""

import logging
import time

import mlflow
import pytest

from conftest import sqlite_locked
from pipeline.errors import PipelineError
from pipeline.tracking.epoch_log import EpochLog


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('epoch_log') / 'mlflow.db'}"  # created once: seconds


@pytest.fixture
def run(store):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as active:
        yield active.info.run_id
    mlflow.set_tracking_uri(previous)


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


def _eventually(read, expected, within_s=10.0):
    """read() once it equals expected (the writes happen in a background thread), else its last value."""
    deadline = time.monotonic() + within_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_with_no_interval_each_epoch_is_written_at_once(run):
    with EpochLog(every_s=0) as log_epoch:
        log_epoch(1, _row(1))
        assert _eventually(lambda: _steps(run), [(1, 1.0)]) == [(1, 1.0)]
        log_epoch(2, _row(2))
        assert _eventually(lambda: _steps(run), [(1, 1.0), (2, 0.5)]) == [(1, 1.0), (2, 0.5)]


def test_a_store_locked_by_another_process_never_stalls_the_loop(run, store):
    """A real lock (BEGIN EXCLUSIVE in another process): MLflow's writes then wait 20 s each. The
    loop's calls return at once; the metrics go in when the lock is gone."""
    with sqlite_locked(store[len("sqlite:///"):]) as release:
        with EpochLog(every_s=0) as log_epoch:
            started = time.monotonic()
            for epoch in range(1, 6):
                log_epoch(epoch, _row(epoch))
                time.sleep(0.05)  # an epoch's work; the writer thread tries meanwhile
            looped = time.monotonic() - started
            release()
    assert looped < 2.0, f"the loop waited {looped:.1f} s on the store"  # a stalled write waits 20 s
    assert [step for step, _ in _steps(run)] == [1, 2, 3, 4, 5]


def test_a_failing_training_still_gets_the_epochs_it_finished(run):
    with pytest.raises(RuntimeError, match="diverged"):
        with EpochLog(every_s=3600) as log_epoch:
            log_epoch(1, _row(1))
            log_epoch(2, _row(2))
            raise RuntimeError("diverged in epoch 3")
    assert [step for step, _ in _steps(run)] == [1, 2]


def _failing_writes(monkeypatch, count):
    """The next `count` writes to the store fail; later ones go through."""
    original, failures = mlflow.MlflowClient.log_batch, [count]

    def log_batch(self, run_id, metrics, **kw):
        if failures[0]:
            failures[0] -= 1
            raise mlflow.exceptions.MlflowException("database is locked")
        return original(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)


def test_a_write_failing_during_training_is_retried_and_training_goes_on(run, monkeypatch, caplog):
    _failing_writes(monkeypatch, 1)
    with caplog.at_level(logging.WARNING), EpochLog(every_s=0) as log_epoch:
        log_epoch(1, _row(1))  # this write fails: kept for the next
        # Wait for the writer thread's try: on a loaded machine it could otherwise come after
        # close, which skips the queued writes for its own last one.
        deadline = time.monotonic() + 10
        while log_epoch.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log_epoch.failures == 1 and _steps(run) == []
        log_epoch(2, _row(2))
    assert [step for step, _ in _steps(run)] == [1, 2]
    assert "database is locked" in caplog.text


def test_when_the_last_write_fails_after_a_failure_the_training_error_is_the_one_raised(run, monkeypatch, caplog):
    _failing_writes(monkeypatch, 5)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="diverged"):
        with EpochLog(every_s=3600) as log_epoch:
            log_epoch(1, _row(1))
            raise RuntimeError("diverged in epoch 2")
    assert "could not write the epoch metrics" in caplog.text and "database is locked" in caplog.text


def test_a_batch_never_exceeds_mlflows_limit_of_metrics(run, monkeypatch):
    monkeypatch.setattr(EpochLog, "MAX_BATCH", 3)  # two metrics per row
    batches = []
    original = mlflow.MlflowClient.log_batch
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch",
                        lambda self, run_id, metrics, **kw: (batches.append(len(metrics)),
                                                             original(self, run_id, metrics=metrics, **kw)))
    with EpochLog(every_s=3600) as log_epoch:
        for epoch in range(1, 6):
            log_epoch(epoch, _row(epoch))
    assert batches == [3, 3, 3, 1]
    assert [step for step, _ in _steps(run)] == [1, 2, 3, 4, 5]


def test_without_an_active_run_it_says_what_is_missing():
    with pytest.raises(PipelineError, match="active MLflow run"):
        EpochLog()
