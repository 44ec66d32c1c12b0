"""`dvc exp run -S` on our conf/ layout: a single value and a --queue grid,
shown by `dvc exp show` with the lr and test-accuracy columns."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow

from conftest import run_ok

LR = "conf/train/sgd.yaml:lr"  # -S edits conf/; the stages read the values from params/resolved.yaml
PARAMS = "params/resolved.yaml"


def _experiments(repo, env):
    """{experiment name: (lr, test accuracy)} from `dvc exp show --json`, baseline excluded."""
    found = {}
    for commit in json.loads(run_ok(["dvc", "exp", "show", "--json"], repo, env)):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get(PARAMS, {}).get("data", {})
                metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
                found[rev["name"]] = (params.get("train", {}).get("lr"), metrics.get("test", {}).get("accuracy"))
    return found


def _run_the_queue(repo, env, jobs, timeout=900):
    """As the README says: `dvc queue start --jobs 2`, `dvc queue status` until every queued
    experiment has ended, `dvc queue stop`. Not `dvc exp run --run-all --jobs 2`: there the
    worker that finishes first cleans the workers' shared message folder, the other one can
    lose its shutdown message and wait forever, and so does the command (DVC 3.67; seen once
    here, its worker logs showing it; treeverse/dvc#10398 reports such hangs)."""
    run_ok(["dvc", "queue", "start", "--jobs", str(jobs)], repo, env)
    deadline = time.monotonic() + timeout
    while True:
        status = run_ok(["dvc", "queue", "status"], repo, env)
        states = re.findall(r"\b(Queued|Running|Success|Failed)\b", status)
        if states and not {"Queued", "Running"} & set(states):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert set(states) == {"Success"}, status
    run_ok(["dvc", "queue", "stop"], repo, env)
    workers = [int(path.read_text()) for path in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")]
    for pid in workers:  # bounded: a worker the stop did not reach is ended by its pid
        for _ in range(30):
            if not _is_a_queue_worker(pid):
                break
            time.sleep(1)
        else:
            os.kill(pid, signal.SIGTERM)


def _is_a_queue_worker(pid):
    try:
        return b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False


def _assert_a_150_column_terminal_shows_lr_and_test_accuracy(repo, env):
    """Plain `dvc exp show` in a terminal: DVC renders the whole table for its pager (less -S),
    which shows the first 150 characters of each line. Run in a pseudo-terminal 150 wide
    (util-linux `script`), the pager replaced by cat."""
    done = subprocess.run(["script", "-qec", "stty cols 150 rows 50; dvc exp show", "/dev/null"], cwd=repo,
                          env=dict(env, DVC_PAGER="cat"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    visible = [line[:150] for line in re.sub(r"\x1b\[[0-9;]*m|\r", "", done.stdout).splitlines()]
    (header,) = [line for line in visible if "Experiment" in line]
    columns = header.split()
    assert "test.accuracy" in columns and "train.lr" in columns, header
    lr_at = header.index(" train.lr ") + 1
    single = [line for line in visible if re.search(r"\bsingle\b", line)]
    assert single and single[0][lr_at:lr_at + 8].strip() == "0.5", visible


def test_dvc_exp_run_single_value_and_queued_grid(repo_copy):
    """The queued runs go first, on a fresh store at the project root: they run in DVC's
    temporary copies, which must not become the experiment's artifact location."""
    repo, env = repo_copy
    env = {key: value for key, value in env.items() if key != "MLFLOW_TRACKING_URI"}  # the project's own store
    run_ok(["dvc", "exp", "run", "--queue", "-S", f"{LR}=0.01,0.3"], repo, env)
    _run_the_queue(repo, env, jobs=2)
    run_ok(["dvc", "exp", "run", "-n", "single", "-S", f"{LR}=0.5"], repo, env)
    table = run_ok(["dvc", "exp", "show", "--csv"], repo, env)
    header = table.splitlines()[0]
    assert "lr" in header and "test.accuracy" in header
    _assert_a_150_column_terminal_shows_lr_and_test_accuracy(repo, env)
    found = _experiments(repo, env)
    assert sorted(lr for lr, _ in found.values()) == [0.01, 0.3, 0.5], found
    assert all(0.80 < accuracy < 0.95 for _, accuracy in found.values())
    assert found["single"][0] == 0.5

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("mnist")
    assert experiment.artifact_location == (repo / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(run.data.params["train.lr"]) for run in runs) == [0.01, 0.3, 0.5]
    for run in runs:  # each run's artifacts are still there after DVC removed its copy
        assert run.info.artifact_uri.startswith((repo / "mlruns").as_uri())
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.info.status == "FINISHED"
