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
from threadpoolctl import threadpool_limits

from pipeline.config import hyperparams, trained_with
from pipeline.core import backend, metrics, model
from pipeline.core.trainer import fit
from pipeline.data import model_file
from pipeline.data.files import write_text
from pipeline.data.splits import load_split, read_manifest
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError
from pipeline.report import evaluation, filters
from pipeline.tracking import runs, serving
from pipeline.tracking.epoch_log import EpochLog
from pipeline.tracking.images import EpochImages
from pipeline.tracking.store import StoreError, store_call

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


def train(cfg, out_dir):
    out_dir = Path(out_dir)
    hp = hyperparams(cfg)
    filters.check(cfg.export)
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
    model_path, history_path, kept = out_dir / model_file.FILE, out_dir / HISTORY_FILE, []
    try:
        with runs.training_run(cfg, manifest, out_dir) as run, threadpool_limits(limits=cfg.backend.threads):
            with store_call("tag the run"):
                runs.set_tags({"backend.resolved": be.name})
            with EpochLog() as log_epoch:  # writes in the background: the loop never waits on the store
                snapshots = EpochImages("filters", cfg.export.log_every_epochs, hp.epochs,  # fit trains in place
                                        lambda epoch: filters.live_grid_image(layers, class_names, cfg.export,
                                                                              be.to_host, f"epoch {epoch} of {hp.epochs}"),
                                        log_epoch.image)
                history = fit(be, hp, rng, layers, train_xy, val_xy, len(class_names), fast=cfg.backend.fast,
                              on_epoch=lambda epoch, row: (log_epoch(epoch, row), snapshots(epoch)))
                layers = [(be.to_host(W), be.to_host(b)) for W, b in layers]
                # The trained result first: nothing that can fail on the store comes before it.
                model_file.save(model_path, layers, trained_with(cfg))  # no local paths: same bytes anywhere
                write_text(history_path, _history_csv(history))
                kept = [model_path, history_path]
            if cfg.evaluate_after_train:  # what the evaluate and export_filters stages do
                test_x, test_y = load_split(cfg.paths.processed, "test")
                report = metrics.evaluate(be, layers, test_x, test_y, len(class_names))
                reports = evaluation.write_reports(report, class_names, out_dir, test_x)
                exported = filters.export_filters(*filters.filters_of(layers, class_names),
                                                  out_dir / "filters", cfg.export)
                kept += [*reports, out_dir / "filters"]
            with store_call("log history.csv and the model"):
                runs.log_files([history_path], None)
                serving.log_model(model_path)
            if cfg.evaluate_after_train:
                with store_call("log the evaluation and the filters"):
                    runs.log_evaluation(report, class_names, reports)
                    runs.log_files(exported, "filters")
    except StoreError as err:
        if not kept:
            raise
        raise PipelineError(f"{err}\nThe trained model is safe: {', '.join(map(str, kept))}") from err
    log.info("MLflow run %s finished", run.info.run_id)
    return history[-1]["val/accuracy"]


def _history_csv(history):
    out = io.StringIO()
    writer = csv.DictWriter(out, [key.replace("/", "_") for key in history[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key.replace("/", "_"): value for key, value in row.items()} for row in history)
    return out.getvalue()


@stage(record_failed_job=runs.record_failed_job)
def main(cfg):
    """Returns the final validation accuracy: the objective of an Optuna sweep."""
    return train(cfg, output_dir())


if __name__ == "__main__":
    main()
