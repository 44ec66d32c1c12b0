"""The training loop: minibatch SGD on any array backend, one row of metrics per epoch.

Each epoch: a fresh shuffle from the host RNG, one SGD step per minibatch, then
loss and accuracy on the training set as it trained (each image scored by the
logits of its own step, the usual running figure) and on the validation set.
Three implementations of the epoch share this loop: the array-API code (any
backend), on backend numba the compiled loops of pipeline.core.compiled, and
on backend cupy the fused kernels of pipeline.core.fused_gpu.
"""

import logging
import math
import sys
import time

import numpy as np

from pipeline.core import codes, model
from pipeline.core.hparams import Hyperparams
from pipeline.core.optim import SGD, learning_rate
from pipeline.errors import JobError

log = logging.getLogger(__name__)


class DivergenceError(JobError):
    pass


def fit(be, hp: Hyperparams, rng, layers, train_xy, val_xy, num_classes, fast=True,
        on_epoch=lambda epoch, row: None, progress=None):
    """Train `layers` (device arrays) in place; return one row of metrics per epoch.
    fast: take the speed paths where they apply: the 8-bit pixel-code path
    (pipeline.core.codes), and on backend numba the compiled loops of softmax
    regression (pipeline.core.compiled, any batch size) when the images are 8-bit
    pixels, and on backend cupy the same in fused kernels, one launch per epoch
    (pipeline.core.fused_gpu, not yet run on a GPU); everything else runs the
    array-API code below (on NumPy for numba).
    progress: a progress bar over the epochs on stderr, with the last epoch's
    figures, instead of a log line per epoch (those then go to DEBUG); None:
    when stderr is a terminal, so CI and DVC logs keep the plain lines."""
    # fast=false is the lecture's plain code everywhere, the compiled loops included.
    epochs = None
    if fast and be.name == "numba":
        epochs = _compiled_epochs(hp, layers, train_xy, val_xy, num_classes)
    elif fast and be.name == "cupy":
        from pipeline.core import fused_gpu  # only backend cupy loads the fused kernels

        epochs = fused_gpu.epochs(hp, layers, train_xy, val_xy, num_classes)
    if epochs is None:
        epochs = _array_api_epochs(be, hp, layers, train_xy, val_xy, num_classes, fast)
    n = len(train_xy[1])
    history = []
    bar = _progress_bar(hp.epochs) if (sys.stderr.isatty() if progress is None else progress) else None
    try:
        for epoch in range(1, hp.epochs + 1):
            started = time.perf_counter()
            lr = learning_rate(hp, epoch)
            train_loss, train_accuracy, val_loss, val_accuracy = epochs(rng.permutation(n), lr)
            row = {"epoch": epoch, "train/loss": float(train_loss), "train/accuracy": float(train_accuracy),
                   "val/loss": float(val_loss), "val/accuracy": float(val_accuracy)}  # one sync per epoch
            if not all(math.isfinite(row[key]) for key in ("train/loss", "val/loss")):
                raise DivergenceError(
                    f"training diverged: the loss is {row['train/loss']} (train) / {row['val/loss']} (val) "
                    f"in epoch {epoch} with train.lr={hp.lr}; lower train.lr"
                )
            seconds = time.perf_counter() - started
            on_epoch(epoch, dict(row, **{"time/epoch_seconds": seconds, "train/lr": lr}))
            # After on_epoch: whoever reads this line may count on the epoch having been handed over.
            log.log(logging.INFO if bar is None else logging.DEBUG,
                    "epoch %d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.2f s)", epoch,
                    row["train/loss"], row["train/accuracy"], row["val/loss"], row["val/accuracy"], seconds)
            if bar is not None:
                bar.set_postfix_str(f"train loss {row['train/loss']:.4f}  val loss {row['val/loss']:.4f} "
                                    f"acc {row['val/accuracy']:.4f}", refresh=False)
                bar.update()
            history.append(row)
    finally:  # also when training fails: the error then starts on a line of its own
        if bar is not None:
            bar.close()
    return history


def _array_api_epochs(be, hp, layers, train_xy, val_xy, num_classes, fast):
    """The epoch on any array backend: epoch(order, lr) -> train loss, accuracy, val loss,
    accuracy (device scalars), training `layers` in place."""
    xp = be.xp
    pixel_codes = codes.pixel_codes(train_xy[0]) if fast and codes.applies(layers, hp.batch_size) else None
    gradients = model.gradients if pixel_codes is None else codes.gradients
    # Work done once, outside the hot loop: images and labels go to the device.
    X = be.to_device(train_xy[0] if pixel_codes is None else pixel_codes)
    labels = be.to_device(np.asarray(train_xy[1], dtype=np.int64))
    X_val, labels_val = be.to_device(val_xy[0]), be.to_device(np.asarray(val_xy[1], dtype=np.int64))
    classes = be.to_device(np.arange(num_classes)[:, None])
    Y_val = xp.astype(classes == labels_val, xp.float32)  # class-major one-hot targets
    optimizer = SGD(xp, layers, hp.momentum, hp.nesterov, hp.weight_decay)
    n, batch = X.shape[0], hp.batch_size

    def epoch(host_order, lr):
        order = be.to_device(host_order)
        # Targets in epoch order, once: each batch's are then a slice.
        labels_epoch = xp.take(labels, order)
        Y_epoch = xp.astype(classes == labels_epoch, xp.float32)
        batch_logits = []  # scored after the epoch in one pass: no per-step metric work
        for start in range(0, n, batch):
            # A per-batch gather keeps the copy in cache for the two matrix products.
            images = xp.take(X, order[start:start + batch], axis=0)
            grads, z = gradients(xp, layers, images, Y_epoch[:, start:start + batch])
            optimizer.step(layers, grads, lr)
            batch_logits.append(z)
        train = model.scores(xp, xp.concat(batch_logits, axis=1), Y_epoch, labels_epoch)
        return (*train, *model.loss_and_accuracy(xp, layers, X_val, Y_val, labels_val))

    return epoch


def _compiled_epochs(hp, layers, train_xy, val_xy, num_classes):
    """The epoch of pipeline.core.compiled for softmax regression on 8-bit pixels, or None
    where it does not apply (the MLP, or images that are not k / 255)."""
    from pipeline.core import compiled  # imports numba: only the numba backend pays for it

    if not compiled.applies(layers, num_classes):
        return None
    found = codes.pixel_codes_of_splits(train_xy[0], val_xy[0])
    if found is None:
        log.info("backend numba: the images are not 8-bit pixels; training on the array-API path (NumPy)")
        return None
    train_codes, val_codes = found
    ((W, b),) = layers
    images, val_images = compiled.Images(train_codes), compiled.Images(val_codes)
    labels, val_labels = (np.asarray(y, dtype=np.int64) for y in (train_xy[1], val_xy[1]))
    weights = compiled.Model(W, b, hp.momentum)
    compiled.warm_up()  # compiling (first run) or loading the cache is setup, not the first epoch's time

    def epoch(order, lr):
        train = compiled.train_epoch(weights, images, labels, order, hp.batch_size, lr, hp.momentum,
                                     hp.nesterov, hp.weight_decay)
        weights.copy_to(W, b)  # `layers` are current for on_epoch, as on the array-API path
        return (*train, *compiled.evaluate(weights, val_images, val_labels))

    return epoch


def _progress_bar(epochs):
    from tqdm import tqdm

    return tqdm(total=epochs, desc="training", unit="epoch", file=sys.stderr, dynamic_ncols=True, leave=True)
