"""The MLflow tracking store: where it is, whether it answers, and what happens
to runs when it fails or their process dies.

- tracking_uri: MLFLOW_TRACKING_URI, else SQLite at the project root.
- open_store: point MLflow at it, check that it answers (a message per cause:
  locked, read-only, corrupt, disk full, server down), then end the runs that
  earlier processes left RUNNING (end_leftovers).
- experiment_id: experiments get an absolute artifact location at the project
  root, whatever the current directory (a queued `dvc exp run` works in a
  temporary copy that DVC deletes).
- StoreError / store_call: a store failure while a run is open, named as such,
  so the training can say that its model is safe.
- Ownership: every run records its process (host, pid, start time). A run whose
  process has died (SIGKILL, out of memory) while it was RUNNING is marked
  KILLED by the next stage or training on that host; a run whose store failed
  under it is marked FAILED with the reason from a record left in
  .pipeline/runs-to-end/, as soon as the store answers again.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path

import mlflow
import psutil
from mlflow.exceptions import MlflowException

from pipeline.config import PROJECT_ROOT
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

OWNER_HOST, OWNER_PID, OWNER_STARTED = "pipeline.owner.host", "pipeline.owner.pid", "pipeline.owner.started"
FAILURE_TAG = "failure_reason"
END_WAIT_S = 5  # how long a failing training waits for the store to take the run's end


class StoreError(PipelineError):
    """The tracking store failed while a run was open."""


def project_root():
    """The project's root; under `dvc exp run --queue`, the real repository (DVC_ROOT), not DVC's temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or PROJECT_ROOT).resolve()


def tracking_uri():
    """MLFLOW_TRACKING_URI if set, else SQLite at the project root, as an absolute URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _sqlite_file(uri):
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_store():
    """Point MLflow at the store, check that it answers, and end the runs earlier
    processes left RUNNING. For SQLite, the first touch creates or migrates the
    schema, which crashes when several processes do it at once; a file lock lets
    one go first."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    db = _sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(f"{db}.lock" if db else os.devnull, "w") as lock:
            if db:
                fcntl.flock(lock, fcntl.LOCK_EX)
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # MlflowException, SQLAlchemy or connection errors; OSError of the lock file
        raise PipelineError(store_failure(uri, err)) from err
    try:
        end_leftovers()
    except Exception as err:  # bookkeeping of older runs never stops this one
        log.warning("could not end the runs earlier processes left RUNNING: %s", str(err)[:300])


def short(err):
    """An exception's message without SQLAlchemy's statement, parameters and links: one line."""
    text = " ".join(str(err).split("[SQL:")[0].split())
    text = re.sub(r"\(raised as a result of [^)]*\)\s*", "", text)
    return text[:300] or type(err).__name__


def store_failure(uri, err):
    """What went wrong with the store at uri, and what to do about it."""
    text = short(err)
    db = _sqlite_file(uri)
    if db is None:
        return (f"MLflow tracking store {uri} does not answer: {text}. Start the tracking server, "
                "or unset MLFLOW_TRACKING_URI to use the local SQLite store.")
    lowered = text.lower()
    if "database is locked" in lowered:
        hint = (f"another process holds a lock on {db} (a long write, or a program that opened it): "
                "let it finish or stop it, then run again")
    elif "readonly" in lowered or "read-only" in lowered or "permission denied" in lowered:
        hint = f"{db} (or its directory) is not writable: check its owner and permissions"
    elif "not a database" in lowered or "malformed" in lowered or "file is encrypted" in lowered:
        hint = (f"{db} is not an SQLite database or is damaged: move it aside (mv {db} {db}.broken) and "
                "run again for a fresh store")
    elif "disk is full" in lowered or "no space left" in lowered or "disk i/o error" in lowered:
        hint = f"the disk under {db} is full (or failing): free space there, then run again"
    else:
        hint = f"check {db}, or point MLFLOW_TRACKING_URI at a tracking server"
    return f"MLflow tracking store {uri} failed: {text}. {hint[0].upper()}{hint[1:]}."


@contextlib.contextmanager
def store_call(what):
    """Turn any failure of the store inside into a StoreError saying `what` failed."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:  # MlflowException, SQLAlchemy, connection errors, OSError of the artifact store
        raise StoreError(f"could not {what}: {store_failure(tracking_uri(), err)}") from err


def experiment_id(name):
    """Get or create the experiment by id. mlflow.set_experiment races under
    parallel starts and can file runs under 'Default'; this does not. A local
    store's experiments keep their artifacts in mlruns/ beside the SQLite file,
    an absolute location; a server decides for itself."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_file(tracking_uri())
        location = (db.parent / "mlruns").as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
    _check_artifact_location(experiment)
    return experiment.experiment_id


def _check_artifact_location(experiment):
    """Warn about an experiment created in a directory that is gone (e.g. by an old
    version in a queued `dvc exp run`'s temporary copy): its artifacts go nowhere useful."""
    location = experiment.artifact_location
    path = Path(location.removeprefix("file://")) if location.startswith(("file://", "/")) else None
    if path is not None and not path.parent.is_dir():
        log.warning("MLflow experiment %r keeps its artifacts in %s, whose directory no longer exists; "
                    "rename the experiment in the UI or set mlflow.experiment to a new name", experiment.name,
                    location)


# --- who owns a run, and runs left RUNNING ----------------------------------------

def owner_tags():
    """This process as the owner of a run: host, pid and start time (a pid is reused, the pair is not)."""
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()),
            OWNER_STARTED: f"{psutil.Process().create_time():.2f}"}


def _owner_alive(tags):
    try:
        pid, started = int(tags[OWNER_PID]), float(tags[OWNER_STARTED])
        return abs(psutil.Process(pid).create_time() - started) < 0.05
    except (KeyError, ValueError, psutil.Error):
        return False


def end_leftovers():
    """End the runs earlier processes could not: FAILED with the recorded reason for
    those whose store failed under them, KILLED for RUNNING runs of this host whose
    owning process has died. Runs of other hosts are left alone: their processes
    cannot be seen from here."""
    client = mlflow.MlflowClient()
    for record in sorted(_pending_dir().glob("*.json")):
        _end_recorded(client, record)
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return
    for run in client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'",
                                  max_results=1000):
        if _owner_alive(run.data.tags):
            continue
        reason = (f"its process (pid {run.data.tags.get(OWNER_PID)} on {host}) ended without ending the run: "
                  "killed (SIGKILL, out of memory) or lost")
        client.set_tag(run.info.run_id, FAILURE_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING: %s; marked KILLED", run.info.run_id, reason)


def _pending_dir():
    return project_root() / ".pipeline" / "runs-to-end"


def _end_recorded(client, record):
    try:
        entry = json.loads(record.read_text())
    except (OSError, ValueError):
        record.unlink(missing_ok=True)
        return
    db = _sqlite_file(str(entry.get("tracking_uri")))
    if db is not None and not db.exists():
        record.unlink(missing_ok=True)  # its store is gone, and the run with it
        return
    if entry.get("tracking_uri") != tracking_uri():
        return  # a run of another store: ended when that store is opened
    try:
        if client.get_run(entry["run_id"]).info.status == "RUNNING":
            client.set_tag(entry["run_id"], FAILURE_TAG, entry["reason"])
            client.set_terminated(entry["run_id"], entry["status"])
            log.warning("MLflow run %s marked %s now that the store answers: %s", entry["run_id"],
                        entry["status"], entry["reason"])
    except MlflowException:
        pass  # the run is not in this store (any more): nothing to end
    record.unlink(missing_ok=True)


def end_when_possible(run_id, status, reason):
    """End run_id with status and reason although the store is failing: a record in
    .pipeline/runs-to-end/ that the next open_store applies, and one attempt now,
    waited for at most END_WAIT_S seconds. Returns the record's path, or None when
    the store took it now."""
    record = _pending_dir() / f"{run_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tracking_uri": tracking_uri(), "run_id": run_id, "status": status,
                                  "reason": reason}) + "\n")
    _forget_active_run(run_id)
    ended = threading.Event()

    def attempt():
        try:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, FAILURE_TAG, reason)
            client.set_terminated(run_id, status)
        except Exception:  # still failing: the record stays for the next process
            return
        record.unlink(missing_ok=True)
        ended.set()

    threading.Thread(target=attempt, daemon=True, name="end-run").start()
    return None if ended.wait(END_WAIT_S) else record


def _forget_active_run(run_id):
    """Take the run off MLflow's stack of active runs without calling the store, which
    would stall once more; else MLflow's atexit handler would try to end it FINISHED.
    (mlflow 3.17's fluent module keeps the stack in _active_run_stack.)"""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
    os.environ.pop("MLFLOW_RUN_ID", None)
    fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
