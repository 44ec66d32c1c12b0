"""Sweeps: one MLflow parent run per Hydra multirun, a child run per job, and a summary.

conf/config.yaml registers SweepCallback under hydra.callbacks. Hydra calls it
in the launching process, whatever the launcher (basic, joblib, submitit):
on_multirun_start opens the store once (so parallel jobs never race to create
a fresh SQLite schema), creates the parent run and hands its id to the jobs in
the environment variable PARENT_ENV, which every launcher passes on to its
workers; each job's training run is then started with parent_run_id.
on_multirun_end gives the parent a summary: a CSV of all jobs, a plot of
final validation and test accuracy against the learning rate, and the best
job's run id and lr as tags. A job that diverges ends FAILED and the sweep
goes on (the train stage returns NaN for it instead of raising); the summary
marks it.

The parent is named by its start and the swept keys (`sweep 2026-12-01 14:05
train.lr`), lists them in the tag sweep.keys, has the fixed part of the config
as params (runs.comparable_params without the swept keys) and the best job's
(by val/accuracy) val and test accuracy as the metrics best/val/accuracy and
best/test/accuracy. Each job's run is named by its swept values (`softmax
lr=0.1`). With mlflow.register=<name>, a sweep that ran to its end registers
the best job's model as the next version of <name> with the alias `best`.
"""

import atexit
import csv
import io
import logging
import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunTag
from omegaconf import OmegaConf

from pipeline.tracking import runs, serving
from pipeline.tracking.runs import PARENT_ENV, SWEPT_ENV
from pipeline.tracking.store import owner_tags

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_accuracy_vs_lr.png"


class SweepCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        runs.open_store()
        self.experiment_id = runs.experiment_id(config.mlflow.experiment)
        sweep_dir = config.hydra.sweep.dir
        self.keys = swept_keys(config)
        client = mlflow.MlflowClient()
        parent = client.create_run(
            self.experiment_id, run_name=f"sweep {datetime.now():%Y-%m-%d %H:%M} {','.join(self.keys)}".strip(),
            tags={"sweep.dir": str(Path(sweep_dir).resolve()), "sweep.keys": ",".join(self.keys),
                  "sweep.overrides": " ".join(config.hydra.overrides.task),
                  **runs.provenance_tags(), **owner_tags()},
        )
        self.parent_id = parent.info.run_id
        fixed = {key: value for key, value in runs.comparable_params(config, runs.raw_digests(config)).items()
                 if not any(key == k or key.startswith(f"{k}.") for k in self.keys)}
        client.log_batch(self.parent_id, params=[Param(key, value) for key, value in fixed.items()])
        os.environ[PARENT_ENV] = self.parent_id
        os.environ[SWEPT_ENV] = ",".join(self.keys)
        log.info("MLflow parent run %s for this sweep", self.parent_id)
        # Hydra calls on_multirun_end only when every job returned. A job that ends
        # without a result (cancelled or timed out by SLURM, its node lost) makes the
        # launcher raise, and Hydra exits with sys.exit(1): the summary is then written here.
        atexit.register(self._summarise, config, aborted=True)
        self.interrupted = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_interrupt(signal.getsignal(sig)))

    def _on_interrupt(self, previous):
        """A handler that notes the interrupt (the parent then ends KILLED) and does what `previous` did."""
        def handler(signum, frame):
            self.interrupted = True
            if callable(previous):
                return previous(signum, frame)
            raise KeyboardInterrupt(f"signal {signum}")
        return handler

    def on_multirun_end(self, config, **kwargs):
        atexit.unregister(self._summarise)
        self._summarise(config, aborted=False)

    def _summarise(self, config, aborted):
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        client = mlflow.MlflowClient()
        children = client.search_runs([self.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'",
                                      order_by=["attributes.start_time ASC"])
        rows = [summary_row(run) for run in children]
        artifacts = Path(config.hydra.sweep.dir)
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / SUMMARY_CSV).write_text(summary_csv(rows))
        plot_accuracy_vs_lr(rows, artifacts / SUMMARY_PNG)
        for name in (SUMMARY_CSV, SUMMARY_PNG):
            client.log_artifact(self.parent_id, str(artifacts / name))
        finished = [r for r in rows if r["status"] == "FINISHED" and not math.isnan(r["val/accuracy"])]
        tags = {"sweep.jobs": str(len(rows)), "sweep.failed": str(len(rows) - len(finished)),
                "sweep.aborted": str(aborted)}
        best = max(finished, key=lambda r: r["val/accuracy"]) if finished else None
        if best:
            tags.update({"best_run_id": best["run_id"], "best_lr": str(best["train.lr"]),
                         "best_val_accuracy": str(best["val/accuracy"])})
            stamp = int(time.time() * 1000)
            client.log_batch(self.parent_id, metrics=[
                Metric("best/val/accuracy", best["val/accuracy"], stamp, 0),
                Metric("best/test/accuracy", best["test/accuracy"], stamp, 0)])
            name = OmegaConf.select(config, "mlflow.register")
            model_uri = next(r for r in children if r.info.run_id == best["run_id"]).data.tags.get(
                serving.MODEL_URI_TAG)
            if name and model_uri and not aborted:
                version = serving.register(model_uri, name, best["run_id"])
                tags["registered_model"] = f"{name} version {version} (models:/{name}@{serving.ALIAS})"
        client.log_batch(self.parent_id, tags=[RunTag(key, value) for key, value in tags.items()])
        # The sweep itself interrupted (Ctrl-C or SIGTERM to this process): KILLED. A job lost on its
        # own (cancelled by SLURM, its node gone) fails the sweep: FAILED.
        client.set_terminated(self.parent_id, "KILLED" if aborted and self.interrupted else
                              "FINISHED" if finished and not aborted else "FAILED")
        log.info("sweep summary (MLflow parent run %s):\n%s", self.parent_id,
                 summary_table(children, self.keys, best and best["run_id"], tags))


def swept_keys(config):
    """The keys a multirun varies: those of its sweep overrides (`train.lr=0.01,0.1`,
    `range(...)`, `choice(...)`) and of hydra.sweeper.params (Optuna's search space)."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return keys + [key for key in params if key not in keys]


def summary_table(children, keys, best_id, tags):
    """The jobs as a small text table (the swept values, status, val and test accuracy),
    the best job marked with *, and a line of totals."""
    header = [*keys, "status", "val/accuracy", "test/accuracy", "run"]
    lines = [header]
    for run in children:
        metrics = run.data.metrics
        lines.append([*(run.data.params.get(key, "?") for key in keys), run.info.status,
                      *(f"{metrics[m]:.4f}" if m in metrics else "-" for m in ("val/accuracy", "test/accuracy")),
                      run.info.run_id + (" *" if run.info.run_id == best_id else "")])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.append(f"{tags['sweep.jobs']} jobs, {tags['sweep.failed']} failed"
                + (", aborted" if tags["sweep.aborted"] == "True" else "")
                + ("; best (*) by val/accuracy" if best_id else "")
                + (f"; registered {tags['registered_model']}" if "registered_model" in tags else ""))
    return "\n".join(text)


def summary_row(run):
    metrics, params = run.data.metrics, run.data.params
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "train.lr": float(params.get("train.lr", "nan")),
        "val/accuracy": metrics.get("val/accuracy", math.nan),
        "test/accuracy": metrics.get("test/accuracy", math.nan),
        "failure_reason": run.data.tags.get("failure_reason", ""),
        "overrides": run.data.tags.get("job.overrides", ""),
    }


def summary_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, ["run_id", "status", "train.lr", "val/accuracy", "test/accuracy",
                                  "failure_reason", "overrides"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_accuracy_vs_lr(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ok = sorted((r for r in rows if r["status"] == "FINISHED"), key=lambda r: r["train.lr"])
    for key, style in (("val/accuracy", "o-"), ("test/accuracy", "s--")):
        ax.plot([r["train.lr"] for r in ok], [r[key] for r in ok], style, label=key)
    for r in rows:
        if r["status"] != "FINISHED":  # mark failed jobs where they would have been
            ax.axvline(r["train.lr"], color="red", alpha=0.4)
            ax.annotate("FAILED", (r["train.lr"], 0.02), xycoords=("data", "axes fraction"),
                        color="red", rotation=90, fontsize=8)
    ax.set(xscale="log", xlabel="train.lr (log scale)", ylabel="final accuracy",
           title="Sweep: accuracy against learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
