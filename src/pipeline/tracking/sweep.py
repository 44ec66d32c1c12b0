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
"""

import atexit
import csv
import io
import logging
import math
import os
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback

from pipeline.tracking import runs
from pipeline.tracking.runs import PARENT_ENV

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_accuracy_vs_lr.png"


class SweepCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        runs.open_store()
        self.experiment_id = runs.experiment_id(config.mlflow.experiment)
        sweep_dir = config.hydra.sweep.dir
        parent = mlflow.MlflowClient().create_run(
            self.experiment_id, run_name=f"sweep {Path(sweep_dir).name}",
            tags={"sweep.dir": str(Path(sweep_dir).resolve()),
                  "sweep.overrides": " ".join(config.hydra.overrides.task)},
        )
        self.parent_id = parent.info.run_id
        os.environ[PARENT_ENV] = self.parent_id
        log.info("MLflow parent run %s for this sweep", self.parent_id)
        # Hydra calls on_multirun_end only when every job returned. A job that ends
        # without a result (cancelled or timed out by SLURM, its node lost) makes the
        # launcher raise, and Hydra exits with sys.exit(1): the summary is then written here.
        atexit.register(self._summarise, config, aborted=True)

    def on_multirun_end(self, config, **kwargs):
        atexit.unregister(self._summarise)
        self._summarise(config, aborted=False)

    def _summarise(self, config, aborted):
        os.environ.pop(PARENT_ENV, None)
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
        if finished:
            best = max(finished, key=lambda r: r["val/accuracy"])
            tags.update({"best_run_id": best["run_id"], "best_lr": str(best["train.lr"]),
                         "best_val_accuracy": str(best["val/accuracy"])})
        for key, value in tags.items():
            client.set_tag(self.parent_id, key, value)
        client.set_terminated(self.parent_id, "FINISHED" if finished and not aborted else "FAILED")
        log.info("sweep summary: %s", tags)


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
