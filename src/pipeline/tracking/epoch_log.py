"""Per-epoch metrics and images for the active MLflow run, written by a background
thread: the training loop never waits on the store."""

import logging
import queue
import threading
import time

import mlflow
from mlflow.entities import Metric

from pipeline.errors import PipelineError
from pipeline.tracking.store import StoreError, short, store_failure, tracking_uri

log = logging.getLogger(__name__)


class EpochLog:
    """Per-epoch metrics (and images) for the active run, written in batches by a
    background thread: one store write (MlflowClient.log_batch) when `every_s`
    seconds have passed since the last, and one on close, also when training
    failed. Each metric keeps its epoch as step and the time the epoch ended.

    Why a thread: a write to a locked SQLite store waits 20 s (MLflow's busy
    timeout) and one to a server that is gone waits for its retries; the loop
    goes on meanwhile. Why batches: a write costs about a tenth of an epoch of
    softmax regression and competes for the GIL (figures in benchmarks/README.md).
    A write that fails is retried at the next interval, its metrics kept; after
    MAX_FAILURES failures in a row the thread stops trying until close. On close
    the metrics not yet written must go in within `close_timeout_s`, else
    StoreError: the record is incomplete. Images are for looking at: one that
    fails is a warning."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
    MAX_FAILURES = 3

    def __init__(self, every_s=1.0, close_timeout_s=45.0):
        run = mlflow.active_run()
        if run is None:
            raise PipelineError("pipeline.tracking.epoch_log.EpochLog needs an active MLflow run (open one with training_run)")
        self.run_id, self.every_s, self.close_timeout_s = run.info.run_id, every_s, close_timeout_s
        self.client = mlflow.MlflowClient()
        self.pending, self.lock = [], threading.Lock()  # metrics not yet written; shared with the thread
        self.jobs = queue.Queue()
        self.failures, self.error, self.closing = 0, None, False
        self.asked_at = time.monotonic()
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlflow-epoch-log")
        self.thread.start()

    def __call__(self, epoch, row):
        stamp = int(time.time() * 1000)
        with self.lock:
            self.pending += [Metric(key, value, stamp, epoch) for key, value in row.items() if key != "epoch"]
        if time.monotonic() - self.asked_at >= self.every_s:
            self.asked_at = time.monotonic()
            self.jobs.put(self._write)

    def image(self, image, key, step):
        """An RGB uint8 array logged under `key` at `step` (the run's Images panel)."""
        self.jobs.put(lambda: self._log_image(image, key, step))

    def _log_image(self, image, key, step):
        if self.failures:  # the store is failing: a picture is not worth another wait
            log.warning("MLflow store failing: the %s image of epoch %d is left out", key, step)
            return
        try:
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
        except Exception as err:  # MlflowException, OSError, connection errors: a failing store
            self.failures, self.error = self.failures + 1, err
            log.warning("MLflow did not take the %s image of epoch %d: %s", key, step, short(err))

    def _write(self):
        with self.lock:
            batch = self.pending[:self.MAX_BATCH]
        while batch:
            self.client.log_batch(self.run_id, metrics=batch)
            with self.lock:
                del self.pending[:len(batch)]
                batch = self.pending[:self.MAX_BATCH]

    def _work(self):
        while (job := self.jobs.get()) is not None:
            if self.closing and job != self._last_write:
                continue  # closing: only the last write counts (it writes all that is pending)
            if job == self._write and self.failures >= self.MAX_FAILURES:
                continue  # the store keeps failing: the metrics wait for close
            try:
                job()
                if job in (self._write, self._last_write):
                    self.failures, self.error = 0, None
            except Exception as err:  # MlflowException, SQLAlchemy or connection errors
                self.failures, self.error = self.failures + 1, err
                log.warning("MLflow did not take the epoch metrics (%s); %s", short(err),
                            "trying again later" if self.failures < self.MAX_FAILURES else
                            "no more tries until the training ends")

    def _last_write(self, attempts=3, pause_s=1.0):
        """The write on close. A store that failed fast (a hiccup) gets a few more tries;
        one that made the write wait (a lock, a timeout) has had its wait."""
        for attempt in range(attempts):
            started = time.monotonic()
            try:
                return self._write()
            except Exception as err:
                self.error = err
                if attempt == attempts - 1 or time.monotonic() - started > 5:
                    raise
                time.sleep(pause_s)

    def close(self):
        """Write what is left (the thread's last job, whatever failed before; jobs still
        queued are dropped); StoreError if it does not go in within close_timeout_s."""
        self.closing = True
        self.jobs.put(self._last_write)
        self.jobs.put(None)
        self.thread.join(self.close_timeout_s)
        if self.thread.is_alive() or self.pending:
            waited = f" (no answer within {self.close_timeout_s:.0f} s)" if self.thread.is_alive() else ""
            cause = (store_failure(tracking_uri(), self.error) + waited if self.error is not None else
                     f"MLflow tracking store {tracking_uri()} did not answer within {self.close_timeout_s:.0f} s")
            raise StoreError(f"could not write the epoch metrics: {cause}")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
            return
        try:  # the curves up to the failure belong in the failed run
            self.close()
        except StoreError as write_error:  # the training's own error is the one to report
            log.warning("%s", write_error)
