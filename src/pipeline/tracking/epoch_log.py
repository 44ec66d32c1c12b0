"""Per-epoch metrics for the active MLflow run, written in batches."""

import logging
import time

import mlflow
from mlflow.entities import Metric

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class EpochLog:
    """Per-epoch metrics for the active run, written in batches: one store write
    (MlflowClient.log_batch) when `every_s` seconds have passed since the last,
    and one on close, also when training failed. Each metric keeps its epoch as
    step and the time the epoch ended. Why: a write to the SQLite store costs
    about a tenth of an epoch of softmax regression, and MLflow's own background
    logging competes for the GIL (figures in benchmarks/README.md). The UI still
    sees the curves grow every `every_s` seconds. A write that fails during training (a server
    hiccup, a locked SQLite file) is retried at the next interval rather than
    ending the training; the write on close must succeed."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, every_s=1.0):
        run = mlflow.active_run()
        if run is None:
            raise PipelineError("pipeline.tracking.epoch_log.EpochLog needs an active MLflow run (open one with training_run)")
        self.run_id, self.every_s = run.info.run_id, every_s
        self.client = mlflow.MlflowClient()
        self.pending, self.written_at = [], time.monotonic()

    def __call__(self, epoch, row):
        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, value, stamp, epoch) for key, value in row.items() if key != "epoch"]
        if time.monotonic() - self.written_at >= self.every_s:
            try:
                self.write()
            except Exception as err:  # MlflowException, SQLAlchemy or connection errors
                self.written_at = time.monotonic()
                log.warning("MLflow did not take the epoch metrics (%s); trying again in %s s", err, self.every_s)

    def write(self):
        while self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending[:self.MAX_BATCH])
            del self.pending[:self.MAX_BATCH]
        self.written_at = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.write()
            return
        try:  # the curves up to the failure belong in the failed run
            self.write()
        except Exception as write_error:  # the training's own error is the one to report
            log.warning("could not write the last epochs' metrics to MLflow: %s", write_error)
