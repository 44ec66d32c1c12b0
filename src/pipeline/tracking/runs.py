"""MLflow bookkeeping: one run per training, reopened by the later stages.

train opens the run and writes its id to run.json beside the model; evaluate
and export_filters reopen that run, so one `dvc repro` gives one complete run.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT
from pipeline.data.files import write_text
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Set by pipeline.tracking.sweep in the launching process: the MLflow parent run of a multirun.
PARENT_ENV = "PIPELINE_MLFLOW_PARENT_RUN_ID"


# A tracking server that is down must fail a run within seconds, not after
# MLflow's default retries (minutes). Set these yourself to override.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
    os.environ.setdefault(_name, _value)


def tracking_uri():
    """MLFLOW_TRACKING_URI if set, else SQLite at the project root, as an absolute
    URI. Under `dvc exp run --queue` the stage runs in a temporary copy; DVC_ROOT
    then names the real repository, whose store the run belongs in."""
    root = os.environ.get("DVC_ROOT") or PROJECT_ROOT
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def open_store():
    """Point MLflow at the store and check that it answers.

    For SQLite, the first touch creates or migrates the schema, which crashes
    when several processes do it at once; a file lock lets one go first.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    lock_path = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = f"{db}.lock"
    with open(lock_path or os.devnull, "w") as lock:
        if lock_path:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception as err:  # MlflowException, SQLAlchemy or connection errors
            raise PipelineError(
                f"MLflow tracking store {uri} does not answer: {str(err)[:300]}. Start the tracking "
                "server, or unset MLFLOW_TRACKING_URI to use the local SQLite store."
            ) from err


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
def training_run(cfg, manifest, out_dir):
    """Start the run of one training: params, tags, and run.json in out_dir."""
    open_store()
    parent = os.environ.get(PARENT_ENV)  # a job of a sweep is a child of the sweep's run
    run = mlflow.start_run(experiment_id=experiment_id(cfg.mlflow.experiment), parent_run_id=parent)
    with _ended_with_status():
        _describe_run(cfg, manifest)
        write_text(Path(out_dir) / RUN_FILE, json.dumps({"run_id": run.info.run_id}) + "\n")
        log.info("MLflow run %s in %s", run.info.run_id, tracking_uri())
        yield run


@contextlib.contextmanager
def reopened_run(cfg, manifest, model_dir):
    """Reopen the run that trained the model in model_dir. If the store does
    not have it (outputs restored by DVC on another machine), continue the run
    tagged with the old id, or start it: evaluate and export_filters then share
    one run there too."""
    open_store()
    run_file = Path(model_dir) / RUN_FILE
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    if run_id and _run_exists(run_id):
        run, restored = mlflow.start_run(run_id=run_id), False
    else:
        experiment = experiment_id(cfg.mlflow.experiment)
        earlier = mlflow.MlflowClient().search_runs(
            [experiment], filter_string=f"tags.restored_from_run_id = '{run_id}'", max_results=1)
        log.warning("run %s (from %s) is not in %s; logging to %s", run_id, run_file, tracking_uri(),
                    f"run {earlier[0].info.run_id}, which continues it" if earlier else "a new run")
        restored = not earlier
        run = mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else mlflow.start_run(experiment_id=experiment)
    with _ended_with_status():
        if restored:
            _describe_run(cfg, manifest)
            mlflow.set_tag("restored_from_run_id", str(run_id))
        yield run


def _run_exists(run_id):
    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


@contextlib.contextmanager
def _ended_with_status():
    """End the active run FINISHED, FAILED (with the reason as a tag), or KILLED
    on Ctrl-C or SIGTERM, which otherwise would leave it RUNNING forever."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        mlflow.set_tag("failure_reason", "interrupted by SIGINT or SIGTERM")
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:4000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _describe_run(cfg, manifest):
    """Params from the config; data tags from the manifest of the arrays really read."""
    mlflow.log_params(flatten(cfg))
    tags = {}
    if manifest is not None:
        tags = {f"data.{key}.sha256": digest for key, digest in manifest["raw_sha256"].items()}
        tags["data.name"] = manifest["dataset"]
    tags["mlflow.source.git.commit"] = _git("rev-parse", "HEAD") or "unknown"
    tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    tags["job.overrides"] = " ".join(_hydra_overrides())
    mlflow.set_tags(tags)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def _hydra_overrides():
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def log_evaluation(report, class_names, paths):
    """Test metrics, the confusion matrix and the report files into the active run."""
    metrics = {"test/loss": report["loss"], "test/accuracy": report["accuracy"]}
    for name, p, r in zip(class_names, report["precision"], report["recall"]):
        key = metric_key(name)
        metrics[f"test/precision/{key}"], metrics[f"test/recall/{key}"] = float(p), float(r)
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"classes": list(class_names), "rows_actual_cols_predicted": report["confusion"].tolist()},
                    "evaluation/confusion_matrix.json")
    log_files(paths, "evaluation")


def metric_key(name):
    """A class name as MLflow takes it in a metric key ('T-shirt/top' -> 'T-shirt_top')."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(name)).strip(" .") or "_"


def set_tags(tags):
    mlflow.set_tags(tags)


def log_files(paths, artifact_dir):
    for path in paths:
        mlflow.log_artifact(str(path), artifact_dir)


def flatten(cfg):
    """The resolved config as dotted keys, e.g. {'train.lr': '0.5'} (MLflow params)."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
