"""Hydra multirun sweeps, read back from MLflow: a parent run per sweep with a
summary, a complete child run per job, and DVC's outputs left alone."""

import csv
import os
import re
import signal
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import prepare
from pipeline.config import PROJECT_ROOT
from pipeline.tracking.serving import MODEL_URI_TAG
from pipeline.tracking.sweep import SUMMARY_CSV, SUMMARY_PNG

# What every training run logs as params: hyperparameters, then the dataset (no files, sources or paths).
PARAMS = {f"train.{key}" for key in ("lr", "epochs", "batch_size", "momentum", "nesterov", "weight_decay",
                                     "schedule", "step_epochs", "gamma")} | {
    "model.name", "model.hidden", "seed", "backend.name", "data.name", "data.val_size", "data.digest"}


def _sweep(fixture_cfg, fixture_overrides, tmp_path, *args, timeout=600):
    prepare(fixture_cfg)
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", *fixture_overrides, *args,
                           f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for noise in ("Downloading artifacts", "Add type hints"):  # a quiet console
        assert noise not in done.stdout + done.stderr
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fixture").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    for run in children:  # named by the swept value; the comparable params only
        assert run.info.run_name == f"softmax lr={float(run.data.params['train.lr']):.4g}"
        assert set(run.data.params) == PARAMS
    assert re.fullmatch(r"sweep \d{4}-\d\d-\d\d \d\d:\d\d train\.lr", parent.info.run_name)
    assert parent.data.tags["sweep.keys"] == "train.lr"
    assert set(parent.data.params) == PARAMS - {"train.lr"}  # the fixed config
    assert parent.data.params["train.epochs"] == "3" and parent.data.params["data.digest"] == \
        children[0].data.params["data.digest"]
    _sweep.output = done.stdout + done.stderr
    return client, parent, children


def _dvc_outputs():
    """(size, mtime) of every file of every output dvc.yaml declares, in the checkout
    the sweep runs from. Read directly rather than by `dvc status`, so that the
    test never runs DVC in the checkout itself."""
    found = {}
    for spec in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []):
            path = PROJECT_ROOT / (entry if isinstance(entry, str) else next(iter(entry)))
            for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                found[str(file.relative_to(PROJECT_ROOT))] = (file.stat().st_size, file.stat().st_mtime_ns)
    return found


def _check_child(client, run, epochs=3):
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == list(range(1, epochs + 1))
    assert "test/accuracy" in run.data.metrics
    paths = {a.path for top in ("filters", "mnist-softmax") for a in client.list_artifacts(run.info.run_id, top)}
    assert "filters/filters.png" in paths and "mnist-softmax/MLmodel" in paths  # the model's name
    assert run.data.tags[MODEL_URI_TAG].startswith("models:/m-")
    assert "filters/filter_0_0.png" in paths
    assert run.data.tags["data.name"] == "mnist" and "data.train_images.sha256" in run.data.tags


def test_serial_sweep_with_a_diverging_job_and_a_refused_value(fixture_cfg, fixture_overrides, tmp_path):
    """Jobs that fail for their own values (a divergence, an lr the config refuses) are
    recorded FAILED with the reason, and the sweep goes on."""
    before = _dvc_outputs()
    client, parent, children = _sweep(fixture_cfg, fixture_overrides, tmp_path, "train.lr=0.01,-1,0.1,1e38",
                                      "mlflow.register=fixture-digits")
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [-1, 0.01, 0.1, 1e38]
    by_lr = {float(r.data.params["train.lr"]): r for r in children}
    for lr in (0.01, 0.1):
        assert by_lr[lr].info.status == "FINISHED"
        _check_child(client, by_lr[lr])
    assert by_lr[1e38].info.status == "FAILED" and "diverged" in by_lr[1e38].data.tags["failure_reason"]
    assert by_lr[-1].info.status == "FAILED" and "train.lr=-1" in by_lr[-1].data.tags["failure_reason"]
    assert "this job failed; the sweep goes on" in _sweep.output

    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["sweep.jobs"] == "4" and tags["sweep.failed"] == "2"
    best = max((by_lr[0.01], by_lr[0.1]), key=lambda r: r.data.metrics["val/accuracy"])
    assert tags["best_run_id"] == best.info.run_id and float(tags["best_lr"]) == float(best.data.params["train.lr"])
    assert parent.data.metrics["best/val/accuracy"] == best.data.metrics["val/accuracy"]
    assert parent.data.metrics["best/test/accuracy"] == best.data.metrics["test/accuracy"]
    version = client.get_model_version_by_alias("fixture-digits", "best")  # mlflow.register
    assert version.run_id == best.info.run_id and version.source == best.data.tags[MODEL_URI_TAG]
    table = _sweep.output[_sweep.output.index("sweep summary"):]  # a table, not a dict
    assert re.search(r"train\.lr\s+status\s+val/accuracy\s+test/accuracy\s+run", table)
    assert f"{best.info.run_id} *" in table and "4 jobs, 2 failed" in table
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {SUMMARY_CSV, SUMMARY_PNG} <= artifacts
    with open(client.download_artifacts(parent.info.run_id, SUMMARY_CSV, str(tmp_path))) as f:
        rows = {float(r["train.lr"]): r for r in csv.DictReader(f)}
    assert rows[1e38]["status"] == "FAILED" and "diverged" in rows[1e38]["failure_reason"]
    assert rows[-1]["status"] == "FAILED" and "train.lr=-1" in rows[-1]["failure_reason"]
    assert float(rows[0.1]["test/accuracy"]) == pytest.approx(by_lr[0.1].data.metrics["test/accuracy"])
    assert len(list((tmp_path / "multirun").glob("*/model.npz"))) == 2  # job outputs under multirun/
    assert _dvc_outputs() == before


def test_joblib_sweep_four_jobs_at_once(fixture_cfg, fixture_overrides, tmp_path):
    before = _dvc_outputs()
    client, parent, children = _sweep(fixture_cfg, fixture_overrides, tmp_path,
                                      "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                                      "train.lr=0.01,0.03,0.1,0.3")
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [0.01, 0.03, 0.1, 0.3]
    for run in children:
        assert run.info.status == "FINISHED"
        _check_child(client, run)
    assert parent.data.tags["sweep.jobs"] == "4" and parent.data.tags["sweep.failed"] == "0"
    assert {SUMMARY_CSV, SUMMARY_PNG} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert _dvc_outputs() == before


def test_optuna_search_over_lr(fixture_cfg, fixture_overrides, tmp_path):
    client, parent, children = _sweep(fixture_cfg, fixture_overrides, tmp_path,
                                      "hparams_search=lr_optuna", "hydra.sweeper.n_trials=3")
    lrs = [float(r.data.params["train.lr"]) for r in children]
    assert len(lrs) == 3 and all(1e-3 <= lr <= 1.0 for lr in lrs)
    results = (tmp_path / "multirun" / "optimization_results.yaml").read_text()
    best = max(children, key=lambda r: r.data.metrics["val/accuracy"])
    assert f"{best.data.metrics['val/accuracy']}"[:6] in results


def test_submitit_local_launcher(fixture_cfg, fixture_overrides, tmp_path):
    client, parent, children = _sweep(fixture_cfg, fixture_overrides, tmp_path,
                                      "hydra/launcher=submitit_local", "train.lr=0.05,0.5")
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [0.05, 0.5]
    for run in children:
        assert run.info.status == "FINISHED"
        _check_child(client, run)


def _parent_and_children():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fixture").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_ctrl_c_ends_the_sweep_killed_with_the_summary_of_the_jobs_so_far(fixture_cfg, fixture_overrides, tmp_path):
    prepare(fixture_cfg)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "-m", *fixture_overrides, "train.epochs=100000",
                             "train.lr=0.01,0.1,0.2", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the first job is training
            if " epoch 3 " in line:
                break
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in output
    client, parent, children = _parent_and_children()
    assert parent.info.status == "KILLED"
    assert parent.data.tags["sweep.aborted"] == "True" and parent.data.tags["sweep.jobs"] == "1"
    assert [r.info.status for r in children] == ["KILLED"]
    assert SUMMARY_CSV in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_setup_error_common_to_all_jobs_stops_the_sweep_at_once(fixture_overrides, tmp_path):
    """No processed data (nothing prepared): the first job says so and no other job starts."""
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", *fixture_overrides,
                           "train.lr=0.01,0.1,0.2", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("manifest.json is missing") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "multirun" / "1").exists()  # the second job never started
    _, parent, children = _parent_and_children()
    assert parent.info.status == "FAILED" and parent.data.tags["sweep.aborted"] == "True"
    assert children == []
