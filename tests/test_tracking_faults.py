"""Faults of the tracking store and of the processes around it, each injected for
real: a store locked by another process, a full disk under it, a tracking server
that goes away, a process killed with SIGKILL, a corrupt or read-only store, runs
from a subdirectory and from a fresh store, ad hoc stages beside DVC's run, and
sweeps that are interrupted or have a job with a refused value.

What every case checks: the trained model is never lost, the exit is 2 with a
message that names the store and the cause, and every run ends with the right
status (at the latest when the next stage opens the store)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from conftest import copy_checkout, fill, free_port, prepare, sqlite_locked, tmpfs
from pipeline.config import PROJECT_ROOT
from pipeline.data import model_file
from pipeline.errors import PipelineError
from pipeline.tracking import store

EPOCHS = 40  # fixture epochs take milliseconds: the fault lands early, the rest must not wait
NO_IMAGES = "export.log_every_epochs=0"  # pictures wait on the store too: left to the test of a short lock


def _train(overrides, out, env=None, cwd=PROJECT_ROOT):
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={out}"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or os.environ.copy())


def _epoch_times(proc, on_epoch, limit_s=180):
    """Read the training's output to its end: (monotonic time each epoch line arrived, all output).
    on_epoch(epoch) runs as each line arrives (the fault is injected there)."""
    watchdog = threading.Timer(limit_s, proc.kill)
    watchdog.start()
    times, lines = {}, []
    try:
        for line in proc.stdout:
            lines.append(line)
            words = line.split("] - ")[-1].split()
            if len(words) > 1 and words[0] == "epoch" and words[1].isdigit():
                times[int(words[1])] = time.monotonic()
                on_epoch(int(words[1]))
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    return times, "".join(lines)


def _runs(uri, experiment="fixture"):
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _assert_model_is_safe(output, out):
    assert "The trained model is safe" in output and str(out / model_file.FILE) in output, output[-3000:]
    layers, _ = model_file.load(out / model_file.FILE)  # complete and checked on load
    assert layers[0][0].shape == (10, 784)
    assert len((out / "history.csv").read_text().splitlines()) == EPOCHS + 1


def _assert_loop_never_waited(times, fault_epoch):
    after = [times[e] for e in range(fault_epoch + 1, EPOCHS + 1)]
    # A write the loop waited for would take 20 s (SQLite's busy timeout) or seconds of HTTP retries.
    assert after[-1] - times[fault_epoch] < 10, f"epochs after the fault took {after[-1] - times[fault_epoch]:.1f} s"


# --- the store fails during training -----------------------------------------

def test_a_store_locked_for_longer_than_the_run_keeps_the_model_and_fails_the_run_later(
        fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    db, out = tmp_path / "mlflow.db", tmp_path / "out"
    with contextlib.ExitStack() as stack:
        release = []

        def lock_at(epoch):
            if epoch == 2:
                release.append(stack.enter_context(sqlite_locked(db)))

        proc = _train([*fixture_overrides, f"train.epochs={EPOCHS}", NO_IMAGES], out)
        times, output = _epoch_times(proc, lock_at)
        assert proc.returncode == 2, output[-3000:]
        _assert_loop_never_waited(times, 2)
        _assert_model_is_safe(output, out)
        assert f"sqlite:///{db}" in output and "Another process holds a lock on" in output, output[-3000:]
        assert "Traceback" not in output
        (run_id,) = {line.split("Run ")[1].split()[0] for line in output.splitlines() if "stays RUNNING" in line}
        release[0]()
    assert [r.info.status for r in _runs(f"sqlite:///{db}")] == ["RUNNING"]  # until someone opens the store
    store.open_store()  # what the next stage or training does first
    (run,) = _runs(f"sqlite:///{db}")
    assert run.info.run_id == run_id and run.info.status == "FAILED"
    assert "database is locked" in run.data.tags["failure_reason"]
    assert not list((PROJECT_ROOT / ".pipeline" / "runs-to-end").glob(f"{run_id}.json"))


def test_a_store_locked_for_a_moment_costs_the_loop_nothing_and_the_run_is_complete(
        fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    db, out = tmp_path / "mlflow.db", tmp_path / "out"
    with contextlib.ExitStack() as stack:
        def lock_at(epoch):
            if epoch == 2:
                release = stack.enter_context(sqlite_locked(db))
                threading.Timer(3, release).start()

        proc = _train([*fixture_overrides, f"train.epochs={EPOCHS}"], out)
        times, output = _epoch_times(proc, lock_at)
    assert proc.returncode == 0, output[-3000:]
    _assert_loop_never_waited(times, 2)
    (run,) = _runs(f"sqlite:///{db}")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")]
    assert steps == list(range(1, EPOCHS + 1))  # every epoch, none lost to the lock


def test_a_full_disk_under_the_store_keeps_the_model_and_names_the_disk(fixture_overrides, fixture_cfg, tmp_path,
                                                                         monkeypatch):
    prepare(fixture_cfg)
    out = tmp_path / "out"
    with tmpfs(tmp_path / "store", size="64m") as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        proc = _train([*fixture_overrides, f"train.epochs={EPOCHS}", NO_IMAGES], out, env=os.environ.copy())
        times, output = _epoch_times(proc, lambda epoch: epoch == 2 and fill(disk))
        assert proc.returncode == 2, output[-3000:]
        _assert_loop_never_waited(times, 2)
        _assert_model_is_safe(output, out)
        assert "autoflush" not in output and "Traceback" not in output
        assert f"The disk under {disk / 'mlflow.db'} is full" in output, output[-1500:]
        (disk / "filler").unlink()
        store.open_store()  # space again: the next stage ends the run
        (run,) = _runs(uri)
        assert run.info.status == "FAILED" and "full" in run.data.tags["failure_reason"]


def _server(port, backend):
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend, "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 90 s")


def test_a_tracking_server_that_goes_away_keeps_the_model_and_the_run_fails_when_it_is_back(
        fixture_overrides, fixture_cfg, tmp_path, monkeypatch):
    prepare(fixture_cfg)
    port, backend, out = free_port(), f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "out"
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = [_server(port, backend)]
    try:
        def stop_at(epoch):
            if epoch == 2:
                os.killpg(server[0].pid, signal.SIGKILL)
                server[0].wait()

        proc = _train([*fixture_overrides, f"train.epochs={EPOCHS}", NO_IMAGES], out, env=os.environ.copy())
        times, output = _epoch_times(proc, stop_at)
        assert proc.returncode == 2, output[-3000:]
        _assert_loop_never_waited(times, 2)
        _assert_model_is_safe(output, out)
        assert uri in output and "Start the tracking server" in output
        server[0] = _server(port, backend)  # back, with the same store
        store.open_store()
        (run,) = _runs(uri)
        assert run.info.status == "FAILED" and run.data.tags["failure_reason"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server[0].pid, signal.SIGKILL)


# --- runs left RUNNING by processes that died ---------------------------------

def test_a_training_killed_with_sigkill_is_marked_killed_by_the_next_stage(fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    proc = _train([*fixture_overrides, "train.epochs=100000"], tmp_path / "out")
    _epoch_times(proc, lambda epoch: epoch == 3 and proc.kill())
    uri = os.environ["MLFLOW_TRACKING_URI"]
    (run,) = _runs(uri)
    assert run.info.status == "RUNNING" and run.data.tags[store.OWNER_PID] == str(proc.pid)
    store.open_store()
    (run,) = _runs(uri)
    assert run.info.status == "KILLED"
    assert f"pid {proc.pid}" in run.data.tags["failure_reason"] and "killed" in run.data.tags["failure_reason"]


def test_only_runs_whose_owner_has_died_on_this_host_are_ended(tmp_path, monkeypatch):
    """Every kind of RUNNING run: a dead owner here (KILLED), a live one (this process), a pid
    reused by another process (KILLED: the start time differs), another host's, one with no owner."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store.open_store()
    client = mlflow.MlflowClient()
    experiment = store.experiment_id("owners")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = store.owner_tags()
    cases = {
        "dead": {**me, store.OWNER_PID: str(dead.pid)},
        "alive": me,
        "pid reused": {**me, store.OWNER_STARTED: f"{float(me[store.OWNER_STARTED]) - 1000:.2f}"},
        "other host": {**me, store.OWNER_HOST: "some-other-node", store.OWNER_PID: str(dead.pid)},
        "no owner": {},
    }
    ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in cases.items()}
    store.open_store()
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "pid reused": "KILLED", "other host": "RUNNING",
                      "no owner": "RUNNING"}


# --- where runs and artifacts go ----------------------------------------------

@pytest.mark.parametrize("where", ["project root", "subdirectory", "elsewhere", "queued dvc exp"])
def test_a_fresh_store_keeps_artifacts_beside_it_whatever_the_current_directory(tmp_path, monkeypatch, where):
    """A queued `dvc exp run` works in a temporary copy (DVC_ROOT names the real repository); a
    relative artifact location would die with the copy."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    cwd = {"project root": root, "subdirectory": root / "src", "elsewhere": tmp_path,
           "queued dvc exp": tmp_path / "dvc-exp-copy"}[where]
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("pipeline.tracking.store.PROJECT_ROOT", root if where != "queued dvc exp" else cwd)
    if where == "queued dvc exp":
        monkeypatch.setenv("DVC_ROOT", str(root))
    store.open_store()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(store.experiment_id("fresh"))
    assert store.tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    assert experiment.artifact_location == (root / "mlruns").as_uri()


def test_a_stage_run_from_a_subdirectory_works_at_the_project_root(fixture_overrides, fixture_cfg, tmp_path):
    """From src/ of a checkout: the run directory, the store and its artifacts at the root, nothing in src/."""
    prepare(fixture_cfg)
    repo = copy_checkout(tmp_path / "repo", skip=("params/resolved.yaml",))
    env = dict(os.environ, PYTHONPATH=str(repo / "src"))
    env.pop("MLFLOW_TRACKING_URI")
    overrides = [o for o in fixture_overrides if not o.startswith("paths.model")]
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *overrides, "hydra.run.dir=outputs/sub"],
                          cwd=repo / "src", env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"running in the project root {repo}" in done.stderr
    assert (repo / "outputs" / "sub" / model_file.FILE).is_file()
    assert not (repo / "src" / "outputs").exists() and not (repo / "src" / "mlflow.db").exists()
    (run,) = _runs(f"sqlite:///{repo / 'mlflow.db'}")
    assert run.info.artifact_uri.startswith((repo / "mlruns").as_uri())


def test_without_a_conf_directory_the_stage_says_how_to_run(tmp_path):
    """A non-editable install: the package without its checkout's conf/."""
    package = tmp_path / "site"
    shutil.copytree(PROJECT_ROOT / "src" / "pipeline", package / "pipeline")
    done = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(package)), timeout=120)
    assert done.returncode == 2 and "no conf/config.yaml" in done.stderr and "pip install -e ." in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_a_run_directory_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path, where):
    """Hydra makes the run directory before any of our code runs: its OSError is worded as ours."""
    (tmp_path / "file").write_text("a file, not a directory")
    run_dir = {"under a file": tmp_path / "file" / "run", "in /proc": Path("/proc/no-such-dir/run")}[where]
    done = subprocess.run([sys.executable, "-m", "pipeline.train", f"hydra.run.dir={run_dir}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and str(run_dir.parent) in done.stderr
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr


# --- messages for a store that cannot work -------------------------------------

def test_a_corrupt_sqlite_file_gets_its_own_hint(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an SQLite database, " * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(PipelineError) as info:
        store.open_store()
    message = str(info.value)
    assert str(db) in message and "damaged" in message and f"mv {db} {db}.broken" in message
    assert "tracking server" not in message  # the remedy for a file, not for a server


def test_a_read_only_store_gets_its_own_hint(tmp_path, monkeypatch):
    """The store's directory on a filesystem mounted read-only (root ignores file modes)."""
    with tmpfs(tmp_path / "ro", size="1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk / 'mlflow.db'}")
        with pytest.raises(PipelineError) as info:
            store.open_store()
        message = str(info.value)
        assert str(disk / "mlflow.db") in message and "is not writable" in message, message
        assert "tracking server" not in message


# --- ad hoc stages beside the pipeline's run ----------------------------------

@pytest.mark.parametrize("stage", ["pipeline.evaluate", "pipeline.export_filters"])
def test_an_ad_hoc_stage_never_changes_the_dvc_pipelines_run(fixture_overrides, fixture_cfg, tmp_path,
                                                            monkeypatch, stage):
    from pipeline import train

    prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    monkeypatch.setenv("DVC_STAGE", "train")  # as `dvc repro` runs it
    train.train(fixture_cfg, tmp_path / "models")
    monkeypatch.delenv("DVC_STAGE")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    (before,) = _runs(uri)
    done = subprocess.run([sys.executable, "-m", stage, *fixture_overrides, f"hydra.run.dir={tmp_path / 'adhoc'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r.info.run_id: r for r in _runs(uri)}
    after = runs.pop(before.info.run_id)
    assert (after.info.status, after.info.end_time, after.data.metrics, after.data.tags) == (
        before.info.status, before.info.end_time, before.data.metrics, before.data.tags)
    (own,) = runs.values()
    assert own.info.status == "FINISHED" and own.data.tags["evaluates_run_id"] == before.info.run_id
    assert own.data.params["train.lr"] == before.data.params["train.lr"]  # described by the model's config
