"""Tracking-server mode: `mlflow server` on 127.0.0.1 backed by SQLite or by
PostgreSQL (Debian's, started here on 127.0.0.1), with a parallel sweep logging to it."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, prepare
from pipeline.config import PROJECT_ROOT

BIN = Path(sys.executable).parent


def _wait_for(url, proc, log, limit_s=120):
    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, Path(log).read_text()[-3000:]
            time.sleep(1)


def _pg_bin():
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    return Path(found).resolve().parent  # /usr/lib/postgresql/<v>/bin, not a wrapper


@pytest.fixture
def postgres_uri():
    """A throwaway PostgreSQL cluster on 127.0.0.1, stopped afterwards by its own pg_ctl."""
    pg = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    run = lambda *args: subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)
    run(str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "start",
        "-o", f"-h 127.0.0.1 -p {port} -k {root}")
    try:
        run(str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run(str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_server(request, tmp_path):
    store = (f"sqlite:///{tmp_path / 'server.db'}" if request.param == "sqlite"
             else request.getfixturevalue("postgres_uri"))
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", store,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_parallel_sweep_logs_to_a_tracking_server(tracking_server, fixture_cfg, fixture_overrides,
                                                  tmp_path, monkeypatch):
    prepare(fixture_cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "-m", *fixture_overrides, "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", "train.lr=0.05,0.5", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_server)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fixture").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [0.05, 0.5]
    for run in children:
        assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
        assert "filters/filters.png" in {a.path for a in client.list_artifacts(run.info.run_id, "filters")}
        assert run.data.tags["data.train_images.sha256"] == fixture_cfg.data.files.train_images.sha256
    assert parent.data.tags["sweep.jobs"] == "2"
