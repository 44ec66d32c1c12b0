"""Stage 3, train: softmax regression by minibatch SGD.

Each epoch: a fresh shuffle from the host RNG, one SGD step per minibatch,
then loss and accuracy on the whole training and validation sets, logged to
MLflow with step=epoch. Writes model.npz (W, b, config), history.csv and
run.json. An ad hoc run (evaluate_after_train=true) also evaluates on the test
set and exports the filters, so its MLflow run is as complete as a `dvc repro`.
"""

import csv
import io
import json
import logging
import math
import time
from pathlib import Path

import hydra
import mlflow
import numpy as np
from omegaconf import OmegaConf

from pipeline import evaluate, export_filters, model, tracking
from pipeline.backend import get_namespace, to_device, to_host
from pipeline.config import output_dir, validate
from pipeline.errors import PipelineError, exit_on_pipeline_error
from pipeline.files import write_text
from pipeline.normalise import load_split

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


class DivergenceError(PipelineError):
    pass


def fit(xp, hp, rng, W, b, train_xy, val_xy, num_classes, on_epoch=lambda epoch, row: None):
    """Train W and b in place; return one row of metrics per epoch."""
    # Work done once, outside the hot loop: data and one-hot targets go to the device.
    X, Y = to_device(xp, train_xy[0]), to_device(xp, model.one_hot(train_xy[1], num_classes))
    X_val, Y_val = to_device(xp, val_xy[0]), to_device(xp, model.one_hot(val_xy[1], num_classes))
    n, batch, lr = X.shape[0], hp.batch_size, float(hp.lr)
    history = []
    for epoch in range(1, hp.epochs + 1):
        started = time.perf_counter()
        order = to_device(xp, rng.permutation(n))
        X_epoch, Y_epoch = xp.take(X, order, axis=0), xp.take(Y, order, axis=0)
        for start in range(0, n, batch):
            model.sgd_step(xp, W, b, X_epoch[start:start + batch], Y_epoch[start:start + batch], lr)
        row = {"epoch": epoch}
        for split, (Xs, Ys) in (("train", (X, Y)), ("val", (X_val, Y_val))):
            loss, accuracy = model.loss_and_accuracy(xp, W, b, Xs, Ys)
            row[f"{split}/loss"], row[f"{split}/accuracy"] = float(loss), float(accuracy)  # one sync per epoch
        if not math.isfinite(row["train/loss"]):
            raise DivergenceError(
                f"training diverged: train/loss is {row['train/loss']} after epoch {epoch} "
                f"with train.lr={hp.lr}; lower train.lr"
            )
        seconds = time.perf_counter() - started
        log.info("epoch %d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.2f s)", epoch,
                 row["train/loss"], row["train/accuracy"], row["val/loss"], row["val/accuracy"], seconds)
        on_epoch(epoch, dict(row, **{"time/epoch_seconds": seconds}))
        history.append(row)
    return history


def train(cfg, out_dir):
    out_dir = Path(out_dir)
    xp = get_namespace(cfg.backend.name)
    train_xy = load_split(cfg.paths.processed, "train")
    val_xy = load_split(cfg.paths.processed, "val")
    if cfg.train.batch_size > len(train_xy[1]):
        raise PipelineError(
            f"config train.batch_size={cfg.train.batch_size}: expected at most the "
            f"{len(train_xy[1])} training images"
        )
    num_classes = len(cfg.data.class_names)
    rng = np.random.default_rng(cfg.seed)  # host RNG: init and shuffles, same on every backend
    W0, b0 = model.init_params(rng, num_classes, train_xy[0].shape[1])
    W, b = to_device(xp, W0), to_device(xp, b0)
    with tracking.training_run(cfg, out_dir):
        history = fit(xp, cfg.train, rng, W, b, train_xy, val_xy, num_classes,
                      on_epoch=lambda epoch, row: mlflow.log_metrics(
                          {k: v for k, v in row.items() if k != "epoch"}, step=epoch))
        W, b = to_host(xp, W), to_host(xp, b)
        config_json = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
        model.save(out_dir / model.FILE, W, b, config_json)
        write_text(out_dir / HISTORY_FILE, _history_csv(history))
        mlflow.log_artifact(str(out_dir / HISTORY_FILE))
        if cfg.evaluate_after_train:
            evaluate.evaluate_and_log(cfg, W, b, out_dir)
            export_filters.export_and_log(cfg, W, out_dir / "filters")


def _history_csv(history):
    out = io.StringIO()
    writer = csv.DictWriter(out, [key.replace("/", "_") for key in history[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key.replace("/", "_"): value for key, value in row.items()} for row in history)
    return out.getvalue()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    train(cfg, output_dir())


if __name__ == "__main__":
    main()
