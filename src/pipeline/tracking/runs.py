"""MLflow bookkeeping: one run per training, reopened by the later stages.

train opens the run and writes its id to run.json beside the model; evaluate
and export_filters reopen that run, so one `dvc repro` gives one complete run.

What a run records, so that runs compare in the UI:
- name: the model and what differs (run_name): `softmax lr=0.1`;
- params: the values a user compares (comparable_params), hyperparameters first,
  then the dataset's name and digest; the full config is the artifact config.yaml;
- datasets: train, val and test as MLflow dataset inputs (the Datasets column),
  digests from the manifest's SHA-256s of the raw files (nothing hashed again);
- tags: the git commit, git.dirty (the tree as the user left it: DVC's own
  outputs and dvc.lock, which DVC rewrites while it runs, do not count), the
  DVC experiment (dvc.exp_name, under `dvc exp run`), the Hydra overrides;
- system metrics (CPU, memory) with mlflow.system_metrics=true.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec
from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT, Config
from pipeline.core.hparams import Hyperparams
from pipeline.data.files import write_text
from pipeline.errors import PipelineError
from pipeline.tracking.store import (FAILURE_TAG, StoreError, end_when_possible, experiment_id, open_store,
                                     owner_tags, store_call, tracking_uri)

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Set by pipeline.tracking.sweep in the launching process: the MLflow parent run of a multirun,
# and the keys the sweep varies (comma-separated), which name each job's run.
PARENT_ENV = "PIPELINE_MLFLOW_PARENT_RUN_ID"
SWEPT_ENV = "PIPELINE_MLFLOW_SWEPT_KEYS"
# Set by DVC for every `dvc exp run` (named with -n, or a generated name), queued or not.
DVC_EXP_ENV, DVC_BASELINE_ENV = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
SPLITS = ("train", "val", "test")
DVC_STAGE_TAG = "dvc.stage"  # on a run that DVC's train stage made
EVALUATES_TAG = "evaluates_run_id"  # on the own run of an evaluate or export_filters that DVC does not run


@contextlib.contextmanager
def training_run(cfg, manifest, out_dir):
    """Start the run of one training: params, tags, and run.json in out_dir."""
    open_store()
    parent = os.environ.get(PARENT_ENV)  # a job of a sweep is a child of the sweep's run
    swept = os.environ.get(SWEPT_ENV, "").split(",") if parent else None
    tags = dict(owner_tags(), **({DVC_STAGE_TAG: os.environ["DVC_STAGE"]} if os.environ.get("DVC_STAGE") else {}))
    with store_call("start a run"):
        run = mlflow.start_run(experiment_id=experiment_id(cfg.mlflow.experiment), parent_run_id=parent,
                               run_name=run_name(cfg, swept), tags=tags, log_system_metrics=_system_metrics(cfg))
    with _ended_with_status(run.info.run_id):
        with store_call("describe the run"):
            _describe_run(cfg, manifest)
        write_text(Path(out_dir) / RUN_FILE, json.dumps({"run_id": run.info.run_id}) + "\n")
        log.info("MLflow run %s in %s", run.info.run_id, tracking_uri())
        yield run


@contextlib.contextmanager
def reopened_run(cfg, manifest, model_dir, trained_with, stage):
    """Reopen the run that trained the model in model_dir, for the stage `stage`
    (evaluate, export_filters). If the store does not have it (outputs restored by
    DVC on another machine), continue the run tagged with the old id, or start it:
    evaluate and export_filters then share one run there too. A stage that DVC
    does not run never writes into a run of the DVC pipeline: it gets a run of its
    own, tagged with the model's run (EVALUATES_TAG). Params and name come from
    the model's own config (trained_with), whatever conf/ says now."""
    open_store()
    try:
        described = OmegaConf.merge(cfg, trained_with)
    except Exception as err:  # omegaconf's errors: a model file from another version of the schema
        log.warning("the model's config does not fit today's schema (%s); its run is described by conf/", err)
        described = cfg
    run_file = Path(model_dir) / RUN_FILE
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    system_metrics, by_dvc = _system_metrics(cfg), bool(os.environ.get("DVC_STAGE"))
    experiment = experiment_id(cfg.mlflow.experiment)
    existing = _run(run_id) if run_id else None
    client = mlflow.MlflowClient()
    if existing is not None and (by_dvc or DVC_STAGE_TAG not in existing.data.tags):
        run, new = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics), False
        mlflow.set_tags(owner_tags())
    elif not by_dvc:
        log.info("%s is not run by DVC: logging to a run of its own, not to run %s of the pipeline", stage, run_id)
        run, new = mlflow.start_run(experiment_id=experiment, run_name=f"{stage}: {run_name(described)}",
                                    tags=dict(owner_tags(), **{EVALUATES_TAG: str(run_id)}),
                                    log_system_metrics=system_metrics), True
    else:
        earlier = client.search_runs([experiment], filter_string=f"tags.restored_from_run_id = '{run_id}'",
                                     max_results=1)
        log.warning("run %s (from %s) is not in %s; logging to %s", run_id, run_file, tracking_uri(),
                    f"run {earlier[0].info.run_id}, which continues it" if earlier else "a new run")
        if earlier:
            run, new = mlflow.start_run(run_id=earlier[0].info.run_id, log_system_metrics=system_metrics), False
            mlflow.set_tags(owner_tags())
        else:
            run, new = mlflow.start_run(experiment_id=experiment, run_name=run_name(described),
                                        tags=dict(owner_tags(), restored_from_run_id=str(run_id)),
                                        log_system_metrics=system_metrics), True
    with _ended_with_status(run.info.run_id):
        if new:
            _describe_run(described, manifest, paths=cfg.paths)
        yield run


def record_failed_job(cfg, err):
    """A run for a sweep's job that failed before it could start one (a config value
    refused): FAILED with the reason, a child of the sweep, named by its swept values."""
    open_store()
    parent = os.environ.get(PARENT_ENV)
    swept = os.environ.get(SWEPT_ENV, "").split(",") if parent else None
    try:
        name = run_name(cfg, swept)
    except Exception:  # a value too broken to name the run by
        name = "refused job"
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(cfg.mlflow.experiment), run_name=name,
                            tags={**owner_tags(), FAILURE_TAG: f"{type(err).__name__}: {err}"[:4000],
                                  "job.overrides": " ".join(_hydra_overrides()),
                                  **({"mlflow.parentRunId": parent} if parent else {})})
    with contextlib.suppress(Exception):  # the values it was refused for, to compare and sort by
        client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in
                                                  comparable_params(cfg, raw_digests(cfg)).items()])
    client.set_terminated(run.info.run_id, "FAILED")


def _system_metrics(cfg):
    """True: MLflow samples CPU, memory (and GPU, with pynvml) as system/* metrics, every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10). None, not False: then
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true still switches it on."""
    return True if cfg.mlflow.system_metrics else None


def _run(run_id):
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None


@contextlib.contextmanager
def _ended_with_status(run_id):
    """End the active run FINISHED, FAILED (with the reason as a tag), or KILLED
    on Ctrl-C or SIGTERM, which otherwise would leave it RUNNING forever. When the
    store fails, the run is ended as soon as it answers again (store.end_when_possible)
    and the error says so."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except BaseException as err:
        if isinstance(err, PipelineError):
            err.run_id = run_id  # recorded: a sweep need not record this job again (pipeline.entry)
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        reason = "interrupted by SIGINT or SIGTERM" if status == "KILLED" else f"{type(err).__name__}: {err}"[:4000]
        try:
            if isinstance(err, StoreError):  # one more call would stall again: straight to later
                raise err
            with store_call(f"mark run {run_id} {status}"):
                mlflow.set_tag(FAILURE_TAG, reason)
                mlflow.end_run(status)
        except StoreError as store_err:
            later = _ended_later(run_id, status, reason)
            if store_err is err:
                raise StoreError(f"{err}{later}") from err
            log.error("%s%s", store_err, later)  # the stage's own error stays the one reported
        raise
    else:
        try:
            with store_call(f"end run {run_id}"):
                mlflow.end_run("FINISHED")
        except StoreError as err:
            raise StoreError(f"{err}{_ended_later(run_id, 'FAILED', str(err))}") from err
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ended_later(run_id, status, reason):
    record = end_when_possible(run_id, status, reason)
    if record is None:
        return f" Run {run_id} is marked {status}."
    return (f" Run {run_id} stays RUNNING until the store answers: the next stage or training that opens it "
            f"marks it {status} ({record}).")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _describe_run(cfg, manifest, paths=None):
    """Params from the config; data tags and inputs from the manifest of the arrays really read
    (paths: where the raw files lie, when cfg is a model's config, which has none)."""
    raw_sha256 = dict(manifest["raw_sha256"]) if manifest is not None else raw_digests(cfg)
    mlflow.log_params(comparable_params(cfg, raw_sha256))
    tags = {f"data.{key}.sha256": digest for key, digest in raw_sha256.items()}
    tags["data.name"] = manifest["dataset"] if manifest is not None else cfg.data.name
    tags.update(provenance_tags())
    tags["job.overrides"] = " ".join(_hydra_overrides())
    mlflow.set_tags(tags)
    if manifest is not None:
        log_datasets(paths or cfg.paths, manifest)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


# --- what a run is called and what it is compared by --------------------------

def comparable_params(cfg, raw_sha256):
    """The params a user compares, hyperparameters first: train.*, model.*, seed and
    backend.name, then the dataset: data.name, data.val_size and data.digest
    (dataset_digest of the raw files). Not data.files, data.sources or paths: the
    full config is the run's artifact config.yaml."""
    params = {f"{group}.{key}": value for group in ("train", "model")
              for key, value in OmegaConf.to_container(cfg[group], resolve=True).items()}
    params.update({"seed": cfg.seed, "backend.name": cfg.backend.name, "data.name": cfg.data.name,
                   "data.val_size": cfg.data.val_size, "data.digest": dataset_digest(raw_sha256)})
    return {key: str(value) for key, value in params.items()}


def raw_digests(cfg):
    """{split key: SHA-256} of the raw files as the config expects them (fetch verifies these)."""
    return {key: spec.sha256 for key, spec in cfg.data.files.items()}


def dataset_digest(raw_sha256, *parts):
    """A short digest of the raw files' SHA-256s (and of `parts`, e.g. a split): the
    dataset's identity without reading its bytes again."""
    text = "\n".join([*(f"{key}={raw_sha256[key]}" for key in sorted(raw_sha256)), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_datasets(paths, manifest):
    """train, val and test as MLflow dataset inputs (context = the split): name
    <dataset>-<split>, digest from the raw files' SHA-256s, the raw directory as
    source, the arrays' shapes as schema."""
    raw, source = manifest["raw_sha256"], f"{Path(paths.raw).resolve() / manifest['dataset']}"
    datasets, contexts = [], []
    for split in SPLITS:
        files = ("test_images", "test_labels") if split == "test" else ("train_images", "train_labels")
        arrays = manifest["arrays"][split]
        schema = Schema([TensorSpec(_dtype(arrays["x"]["dtype"]), tuple(arrays["x"]["shape"]), "x"),
                         TensorSpec(_dtype(arrays["y"]["dtype"]), tuple(arrays["y"]["shape"]), "y")])
        digest = dataset_digest({key: raw[key] for key in files}, split, manifest["val_size"])
        datasets.append(MetaDataset(_Source(source), name=f"{manifest['dataset']}-{split}",
                                    digest=digest, schema=schema))
        contexts.append(split)
    # Jobs of a parallel sweep log the same datasets at once; the store creates a dataset on first
    # use and one of two racing inserts fails (UNIQUE constraint): the retry then finds it. The
    # inputs describe the run; training does not stop for them.
    for attempt in range(3):
        try:
            mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=[None] * len(datasets))
            return
        except Exception as err:  # MlflowException from a server, SQLAlchemy's from a local store
            if attempt == 2:
                log.warning("MLflow did not take the dataset inputs (%s); the run goes on without them",
                            str(err)[:200])
                return
            time.sleep(0.2 * (attempt + 1))


def _dtype(name):
    return np.dtype(name)


class _Source(DatasetSource):
    """Where a dataset lies: a directory of raw files (what the UI shows as the source)."""

    def __init__(self, path):
        self.path = str(path)

    @staticmethod
    def _get_source_type():
        return "local"

    def load(self, **kwargs):
        return self.path

    @staticmethod
    def _can_resolve(raw_source):
        return False

    @classmethod
    def _resolve(cls, raw_source):
        return cls(raw_source)

    def to_dict(self):
        return {"uri": self.path}

    @classmethod
    def from_dict(cls, source_dict):
        return cls(source_dict["uri"])


def run_name(cfg, swept=None):
    """The model's name, then `key=value` for what sets this run apart (train.* keys
    without their `train.` prefix, floats to 4 significant digits):
    - a job of a sweep (swept = the sweep's keys, from Hydra's overrides): the swept values,
      e.g. `softmax lr=0.1`;
    - any other run (`dvc repro`, `dvc exp run`, an ad hoc run): the hyperparameters
      that differ from the schema's defaults (core/hparams.py, seed 0, no hidden layers),
      and the dataset unless it is mnist, e.g. `mlp hidden=[256] epochs=30`."""
    values = []
    if swept is not None:
        for key in filter(None, swept):
            value = OmegaConf.select(cfg, key, default=None)
            if OmegaConf.is_config(value) or value is None:  # a config group, e.g. model=softmax,mlp
                value = _hydra_choices().get(key, value)
            if key != "model":  # the model's name comes first anyway
                values.append((key, value))
    else:
        defaults = {f"train.{f.name}": f.default for f in dataclasses.fields(Hyperparams)}
        defaults.update({"model.hidden": [], "seed": Config.seed})
        current = {f"train.{key}": value for key, value in OmegaConf.to_container(cfg.train).items()}
        current.update({"model.hidden": list(cfg.model.hidden), "seed": cfg.seed})
        values = [(key, value) for key, value in current.items() if value != defaults.get(key)]
        if cfg.data.name != "mnist":
            values.append(("data", cfg.data.name))
    shown = [f"{key.removeprefix('train.').removeprefix('model.')}={_short(value)}" for key, value in values]
    return " ".join([str(cfg.model.name), *shown])


def _short(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) or OmegaConf.is_config(value):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _hydra_choices():
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


# --- provenance ----------------------------------------------------------------

def provenance_tags(root=None):
    """The commit, whether the tree differs from it (git_dirty), and the DVC experiment."""
    root = Path(root or PROJECT_ROOT)
    tags = {"mlflow.source.git.commit": _git("rev-parse", "HEAD", cwd=root) or "unknown",
            "git.dirty": git_dirty(root)}
    for env, tag in ((DVC_EXP_ENV, "dvc.exp_name"), (DVC_BASELINE_ENV, "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def git_dirty(root=None):
    """'True' when a tracked file differs from the commit, 'False' when none does,
    'unknown' outside git. dvc.lock and every out, metric and plot of dvc.yaml's stages
    do not count: DVC rewrites or deletes them while `dvc repro` runs, so inside a stage
    the tree always differs there. Untracked files do not count either."""
    root = Path(root or PROJECT_ROOT)
    excludes = [f":(exclude){path}" for path in dvc_managed(root)]
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excludes, cwd=root)
    return "unknown" if status is None else str(bool(status))


def dvc_managed(root):
    """dvc.lock and the outs, metrics and plots that dvc.yaml's stages declare."""
    try:
        stages = (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        stages = {}
    paths = ["dvc.lock"]
    for spec in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in (spec.get(kind) or []) if isinstance(spec, dict) else []:
                path = entry if isinstance(entry, str) else next(iter(entry))
                if "${" not in path:  # a templated path (foreach, vars) is left to count
                    paths.append(path.rstrip("/"))
    return paths


def _hydra_overrides():
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _git(*args, cwd=None):
    """git's output, stripped; None when git fails (no git, not a repository)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd or PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


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
