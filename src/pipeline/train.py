"""Stage 3, train: softmax regression (or an MLP) by minibatch SGD.

Runs the loop of pipeline.core.trainer on the processed arrays (after checking
their manifest against the config) and logs each epoch's loss and accuracy
(train and validation) to MLflow with step=epoch. Writes model.npz (layers,
config), history.csv and run.json, and logs a pyfunc model. An ad hoc run
(evaluate_after_train=true) also evaluates on the test set and exports the
filters, so its MLflow run is as complete as a `dvc repro`. In a multirun it
returns the final validation accuracy (the Optuna objective).
"""

import csv
import io
import logging
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from threadpoolctl import threadpool_limits

from pipeline.config import hyperparams, trained_with
from pipeline.core import backend, metrics, model
from pipeline.core.trainer import DivergenceError, fit
from pipeline.data import model_file
from pipeline.data.files import write_text
from pipeline.data.splits import load_split, read_manifest
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError
from pipeline.report import evaluation, filters
from pipeline.tracking import runs, serving
from pipeline.tracking.epoch_log import EpochLog
from pipeline.tracking.images import EpochImages

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


def train(cfg, out_dir):
    out_dir = Path(out_dir)
    hp = hyperparams(cfg)
    be = backend.select(cfg.backend.name)
    manifest = read_manifest(cfg.paths.processed, cfg.data)
    train_xy = load_split(cfg.paths.processed, "train")
    val_xy = load_split(cfg.paths.processed, "val")
    if hp.batch_size > len(train_xy[1]):
        raise PipelineError(
            f"config train.batch_size={hp.batch_size}: expected at most the {len(train_xy[1])} training images"
        )
    class_names = list(cfg.data.class_names)
    rng = np.random.default_rng(cfg.seed)  # host RNG: init and shuffles, same on every backend
    sizes = [train_xy[0].shape[1], *cfg.model.hidden, len(class_names)]
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, sizes)]
    with runs.training_run(cfg, manifest, out_dir) as run, threadpool_limits(limits=cfg.backend.threads):
        runs.set_tags({"backend.resolved": be.name})
        snapshots = EpochImages("filters", cfg.export.log_every_epochs, hp.epochs,  # fit trains layers in place
                                lambda epoch: filters.live_grid_image(layers, class_names, cfg.export, be.to_host,
                                                                      f"epoch {epoch} of {hp.epochs}"))
        with EpochLog() as log_epoch:
            history = fit(be, hp, rng, layers, train_xy, val_xy, len(class_names), fast=cfg.backend.fast,
                          on_epoch=lambda epoch, row: (log_epoch(epoch, row), snapshots(epoch)))
        layers = [(be.to_host(W), be.to_host(b)) for W, b in layers]
        model_file.save(out_dir / model_file.FILE, layers, trained_with(cfg))  # no local paths: same bytes anywhere
        write_text(out_dir / HISTORY_FILE, _history_csv(history))
        runs.log_files([out_dir / HISTORY_FILE], None)
        serving.log_model(out_dir / model_file.FILE)
        if cfg.evaluate_after_train:  # what the evaluate and export_filters stages do
            test_x, test_y = load_split(cfg.paths.processed, "test")
            report = metrics.evaluate(be, layers, test_x, test_y, len(class_names))
            runs.log_evaluation(report, class_names, evaluation.write_reports(report, class_names, out_dir, test_x))
            runs.log_files(filters.export_filters(*filters.filters_of(layers, class_names),
                                                  out_dir / "filters", cfg.export), "filters")
    log.info("MLflow run %s finished", run.info.run_id)
    return history[-1]["val/accuracy"]


def _history_csv(history):
    out = io.StringIO()
    writer = csv.DictWriter(out, [key.replace("/", "_") for key in history[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key.replace("/", "_"): value for key, value in row.items()} for row in history)
    return out.getvalue()


@stage
def main(cfg):
    """Returns the final validation accuracy: the objective of an Optuna sweep."""
    try:
        return train(cfg, output_dir())
    except DivergenceError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # The MLflow run is already FAILED with the reason; the rest of the sweep goes on.
        log.error("%s (this job failed; the sweep goes on)", err)
        return float("nan")


if __name__ == "__main__":
    main()
