"""Stage 3, train: softmax regression (or an MLP) by minibatch SGD.

Each epoch: a fresh shuffle from the host RNG, one SGD step per minibatch,
then loss and accuracy logged to MLflow with step=epoch: on the training set
as it trained (each image scored by the logits of its own step, the usual
running figure), on the validation set after the epoch. Writes model.npz
(layers, config), history.csv and run.json, and logs a pyfunc model. An ad hoc
run (evaluate_after_train=true) also evaluates on the test set and exports the
filters, so its MLflow run is as complete as a `dvc repro`. In a multirun it
returns the final validation accuracy (the Optuna objective).
"""

import csv
import io
import json
import logging
import math
import time
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
from pipeline.optim import SGD, learning_rate

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


class DivergenceError(PipelineError):
    pass


def fit(be, hp, rng, layers, train_xy, val_xy, num_classes, on_epoch=lambda epoch, row: None):
    """Train `layers` (device arrays) in place; return one row of metrics per epoch."""
    xp = be.xp
    # Work done once, outside the hot loop: data and one-hot targets go to the device.
    X, Y = be.to_device(train_xy[0]), be.to_device(model.one_hot(train_xy[1], num_classes))
    X_val, Y_val = be.to_device(val_xy[0]), be.to_device(model.one_hot(val_xy[1], num_classes))
    optimizer = SGD(xp, layers, hp.momentum, hp.nesterov, hp.weight_decay)
    n, batch = X.shape[0], hp.batch_size
    history = []
    for epoch in range(1, hp.epochs + 1):
        started = time.perf_counter()
        lr = learning_rate(hp, epoch)
        order = be.to_device(rng.permutation(n))
        Y_epoch = xp.take(Y, order, axis=1)  # targets in epoch order, once: each batch's are then a slice
        batch_logits = []  # kept to score the epoch afterwards in one pass: no per-step metric work
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            # A per-batch gather of the images keeps the copy in cache for the two matrix products.
            grads, z = model.gradients(xp, layers, xp.take(X, order[start:stop], axis=0), Y_epoch[:, start:stop])
            optimizer.step(layers, grads, lr)
            batch_logits.append(z)
        # Train metrics: each image scored by the model as it was when that image was trained on.
        train_loss, train_accuracy = model.scores(xp, xp.concat(batch_logits, axis=1), Y_epoch)
        val_loss, val_accuracy = model.loss_and_accuracy(xp, layers, X_val, Y_val)
        row = {"epoch": epoch, "train/loss": float(train_loss), "train/accuracy": float(train_accuracy),
               "val/loss": float(val_loss), "val/accuracy": float(val_accuracy)}  # one sync per epoch
        if not all(math.isfinite(row[key]) for key in ("train/loss", "val/loss")):
            raise DivergenceError(
                f"training diverged: the loss is {row['train/loss']} (train) / {row['val/loss']} (val) "
                f"in epoch {epoch} with train.lr={hp.lr}; lower train.lr"
            )
        seconds = time.perf_counter() - started
        log.info("epoch %d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.2f s)", epoch,
                 row["train/loss"], row["train/accuracy"], row["val/loss"], row["val/accuracy"], seconds)
        on_epoch(epoch, dict(row, **{"time/epoch_seconds": seconds, "train/lr": lr}))
        history.append(row)
    return history


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
        # Logged in the background (synchronous=False): the next epoch does not wait for the store.
        history = fit(be, cfg.train, rng, layers, train_xy, val_xy, num_classes,
                      on_epoch=lambda epoch, row: mlflow.log_metrics(
                          {k: v for k, v in row.items() if k != "epoch"}, step=epoch, synchronous=False))
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
