"""MLflow bookkeeping: one run per training, reopened by the later stages.

train opens the run and writes its id to run.json beside the model; evaluate
and export_filters reopen that run, so one `dvc repro` gives one complete run.
"""

import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT, flatten
from pipeline.files import write_text

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def tracking_uri():
    """MLFLOW_TRACKING_URI if set, else SQLite at the project root (absolute, so
    the store does not depend on the current directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def experiment_id(name):
    """Get or create the experiment by id. mlflow.set_experiment races under
    parallel starts and can file runs under 'Default'; this does not."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def training_run(cfg, out_dir):
    """Start the run of one training: params, tags, and run.json in out_dir.
    An exception inside ends the run FAILED; Ctrl-C ends it KILLED."""
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(experiment_id=experiment_id(cfg.mlflow.experiment)) as run:
        _describe_run(cfg)
        write_text(Path(out_dir) / RUN_FILE, json.dumps({"run_id": run.info.run_id}) + "\n")
        log.info("MLflow run %s in %s", run.info.run_id, tracking_uri())
        yield run


@contextlib.contextmanager
def reopened_run(cfg, model_dir):
    """Reopen the run that trained the model in model_dir. If the store does
    not have it (outputs restored by DVC on another machine), start a new run
    tagged with the old id rather than fail."""
    mlflow.set_tracking_uri(tracking_uri())
    run_file = Path(model_dir) / RUN_FILE
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    try:
        mlflow.MlflowClient().get_run(run_id or "none")
    except MlflowException:
        log.warning("run %s (from %s) is not in %s; logging to a new run", run_id, run_file, tracking_uri())
        with mlflow.start_run(experiment_id=experiment_id(cfg.mlflow.experiment)) as run:
            _describe_run(cfg)
            mlflow.set_tag("restored_from_run_id", str(run_id))
            yield run
        return
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def _describe_run(cfg):
    mlflow.log_params(flatten(cfg))
    tags = {f"data.{spec.name}.sha256": spec.sha256 for spec in cfg.data.files.values()}
    tags["mlflow.source.git.commit"] = _git("rev-parse", "HEAD") or "unknown"
    tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    mlflow.set_tags(tags)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
