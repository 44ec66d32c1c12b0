"""Stage 3, train: softmax regression (or an MLP) by minibatch SGD.

Runs the loop of pipeline.trainer and logs each epoch's loss and accuracy (train
and validation) to MLflow with step=epoch. Writes model.npz
(layers, config), history.csv and run.json, and logs a pyfunc model. An ad hoc
run (evaluate_after_train=true) also evaluates on the test set and exports the
filters, so its MLflow run is as complete as a `dvc repro`. In a multirun it
returns the final validation accuracy (the Optuna objective).
"""

import csv
import io
import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import mlflow
import numpy as np
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from pipeline import backend, evaluate, export_filters, model, serving, tracking
from pipeline.config import CONF_DIR, output_dir, validate
from pipeline.errors import PipelineError, exit_on_pipeline_error
from pipeline.files import write_text
from pipeline.normalise import load_split
from pipeline.trainer import DivergenceError, fit

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


def train(cfg, out_dir):
    out_dir = Path(out_dir)
    be = backend.select(cfg.backend.name)
    train_xy = load_split(cfg.paths.processed, "train")
    val_xy = load_split(cfg.paths.processed, "val")
    if cfg.train.batch_size > len(train_xy[1]):
        raise PipelineError(
            f"config train.batch_size={cfg.train.batch_size}: expected at most the "
            f"{len(train_xy[1])} training images"
        )
    num_classes = len(cfg.data.class_names)
    rng = np.random.default_rng(cfg.seed)  # host RNG: init and shuffles, same on every backend
    sizes = [train_xy[0].shape[1], *cfg.model.hidden, num_classes]
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, sizes)]
    with tracking.training_run(cfg, out_dir), threadpool_limits(limits=cfg.backend.threads):
        mlflow.set_tag("backend.resolved", be.name)
        with tracking.EpochLog() as log_epoch:
            history = fit(be, cfg.train, rng, layers, train_xy, val_xy, num_classes, on_epoch=log_epoch)
        layers = [(be.to_host(W), be.to_host(b)) for W, b in layers]
        config_json = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
        model.save(out_dir / model.FILE, layers, config_json)
        write_text(out_dir / HISTORY_FILE, _history_csv(history))
        mlflow.log_artifact(str(out_dir / HISTORY_FILE))
        serving.log_model(out_dir / model.FILE)
        if cfg.evaluate_after_train:
            evaluate.evaluate_and_log(cfg, layers, out_dir)
            export_filters.export_and_log(cfg, layers, out_dir / "filters")
    return history[-1]["val/accuracy"]


def _history_csv(history):
    out = io.StringIO()
    writer = csv.DictWriter(out, [key.replace("/", "_") for key in history[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key.replace("/", "_"): value for key, value in row.items()} for row in history)
    return out.getvalue()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_pipeline_error
def main(cfg):
    """Returns the final validation accuracy: the objective of an Optuna sweep."""
    validate(cfg)
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
