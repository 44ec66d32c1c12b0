"""Beyond one machine: a Hydra sweep through the submitit_slurm launcher on a
one-node SLURM cluster (scripts/local-slurm.sh, Debian's slurm-wlm and munge,
on 127.0.0.1), logging to an MLflow tracking server on 127.0.0.1. What SLURM
records (its job-completion log) and what MLflow records must agree: two
completed jobs, two FINISHED children under one parent; and a job cancelled
by SLURM (scancel) ends as a KILLED child."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, prepare
from pipeline.config import PROJECT_ROOT

BIN = Path(sys.executable).parent
SCRIPT = PROJECT_ROOT / "scripts" / "local-slurm.sh"
PARTITION = "local"  # the partition scripts/local-slurm.sh defines
INSTALL = "apt-get install slurm-wlm munge (.ci/run does it)"
LAUNCHER = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}",
            "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]


def _wait(condition, limit_s, what, every_s=0.5):
    """condition()'s first truthy value within limit_s seconds, else a failure naming `what`."""
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster of scripts/local-slurm.sh in a fresh state dir: the environment
    for its commands (SLURM_CONF, and PATH with its sacct first), and the dir."""
    if not all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in ("slurmctld", "slurmd", "munged")):
        pytest.skip(f"SLURM or munge is not installed ({INSTALL})")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_STATE_DIR=str(state))
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
        if up.returncode == 3:  # the script's code for missing packages
            pytest.skip(f"{up.stderr.strip()} ({INSTALL})")
        assert up.returncode == 0, up.stdout + up.stderr
        conf = re.search(r"^export SLURM_CONF=(\S+)$", up.stdout, re.M).group(1)
        assert Path(conf) == state / "slurm.conf"
        yield dict(env, SLURM_CONF=conf, PATH=f"{state / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"), state
    finally:
        pids = {d: (state / "run" / f"{d}.pid").read_text().strip() for d in ("munged", "slurmctld", "slurmd")
                if (state / "run" / f"{d}.pid").exists()}
        down = subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        for name, pid in pids.items():  # `down` stopped exactly these
            assert f"stopped {name} ({pid})" in down.stdout and not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite behind it), stopped by its own pid."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port, log = free_port(), root / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 120, f"mlflow server on port {port}")
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _sweep_cmd(fixture_overrides, experiment, tmp_path, *args):
    overrides = [o for o in fixture_overrides if not o.startswith("mlflow.experiment=")]
    return [sys.executable, "-m", "pipeline.train", "-m", *overrides, f"mlflow.experiment={experiment}",
            *LAUNCHER, *args, f"hydra.sweep.dir={tmp_path / 'multirun'}"]


def _runs(url, experiment):
    """(client, parent, children) of the one sweep logged to `experiment`."""
    mlflow.set_tracking_uri(url)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return client, parent, children


def _slurm_records(state, array_job):
    """{array task id: JobState} of `array_job` in SLURM's job-completion log."""
    records = {}
    for line in (state / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("ArrayJobId") == array_job:
            records[int(fields["ArrayTaskId"])] = fields["JobState"]
    return records


def _array_job(tmp_path):
    """The SLURM job id of the sweep's array, from submitit's folders (<job>_<task>)."""
    folders = (tmp_path / "multirun" / ".submitit").iterdir()
    (job,) = {m.group(1) for m in (re.fullmatch(r"(\d+)_\d+", p.name) for p in folders) if m}
    return job


def test_sweep_runs_as_slurm_jobs(slurm, tracking_server, fixture_cfg, fixture_overrides, tmp_path):
    env, state = slurm
    prepare(fixture_cfg)
    env = dict(env, MLFLOW_TRACKING_URI=tracking_server)
    done = subprocess.run(_sweep_cmd(fixture_overrides, "slurm", tmp_path, "train.lr=0.05,0.1"),
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    job = _array_job(tmp_path)  # SLURM's own record: one completed array task per child
    assert _wait(lambda: len(_slurm_records(state, job)) == 2 and _slurm_records(state, job), 30,
                 "both jobs in SLURM's job-completion log") == {0: "COMPLETED", 1: "COMPLETED"}

    client, parent, children = _runs(tracking_server, "slurm")
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [0.05, 0.1]
    for run in children:
        assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
        assert "mnist-softmax/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "mnist-softmax")}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.jobs"] == "2" and parent.data.tags["sweep.failed"] == "0"


def test_job_cancelled_by_slurm_ends_killed(slurm, tracking_server, fixture_cfg, fixture_overrides, tmp_path):
    env, state = slurm
    prepare(fixture_cfg)
    env = dict(env, MLFLOW_TRACKING_URI=tracking_server)
    # Array task 0 trains 2 epochs; task 1 would train for hours: it is cancelled once it trains.
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        sweep = subprocess.Popen(_sweep_cmd(fixture_overrides, "slurm-cancel", tmp_path, "train.epochs=2,1000000"),
                                 cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        mlflow.set_tracking_uri(tracking_server)
        client = mlflow.MlflowClient()

        def long_run_training():  # the long job's run exists and has logged epochs
            experiment = client.get_experiment_by_name("slurm-cancel")
            runs = experiment and client.search_runs([experiment.experiment_id],
                                                     "params.`train.epochs` = '1000000'")
            return bool(runs) and runs[0].info.status == "RUNNING" and "val/accuracy" in runs[0].data.metrics

        _wait(long_run_training, 90, "the long job training, seen in MLflow")
        job = _array_job(tmp_path)
        squeue = lambda: subprocess.run(["squeue", "-h", "-r", "-j", f"{job}_1", "-o", "%T"], env=env,
                                        capture_output=True, text=True, timeout=30).stdout.strip()
        assert squeue() == "RUNNING"
        subprocess.run(["scancel", f"{job}_1"], env=env, check=True, timeout=30)
        sweep.wait(timeout=120)  # SLURM's kill, submitit's sacct poll, its 15 s wait for a result
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGTERM)
            sweep.wait(timeout=30)
    out = log.read_text()
    assert sweep.returncode != 0, out[-3000:]  # the launcher reports the job that has no result
    assert re.search(rf"Job {job}_1 .*has not produced any output \(state: CANCELLED", out, re.S), out[-3000:]

    assert _wait(lambda: len(_slurm_records(state, job)) == 2 and _slurm_records(state, job), 30,
                 "both jobs in SLURM's job-completion log") == {0: "COMPLETED", 1: "CANCELLED"}

    client, parent, children = _runs(tracking_server, "slurm-cancel")
    by_epochs = {int(r.data.params["train.epochs"]): r for r in children}
    assert sorted(by_epochs) == [2, 1000000]
    assert by_epochs[2].info.status == "FINISHED"
    killed = by_epochs[1000000]
    assert killed.info.status == "KILLED", killed.info.status
    assert killed.data.tags["failure_reason"] == "interrupted by SIGINT or SIGTERM"

    # Hydra skips on_multirun_end when the launcher raises; SweepCallback summarises at exit.
    assert parent.data.tags["sweep.jobs"] == "2" and parent.data.tags["sweep.failed"] == "1"
    assert parent.data.tags["sweep.aborted"] == "True" and parent.info.status == "FAILED"
