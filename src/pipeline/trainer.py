"""The training loop: minibatch SGD on any array backend, one row of metrics per epoch.

Backend-agnostic, and this module does not import MLflow: the train stage, the
benchmarks and the GPU check (which runs where MLflow is not installed) all run
this very loop.
Each epoch: a fresh shuffle from the host RNG, one SGD step per minibatch, then
loss and accuracy on the training set as it trained (each image scored by the
logits of its own step, the usual running figure) and on the validation set.
"""

import logging
import math
import time

import numpy as np

from pipeline import model
from pipeline.errors import PipelineError
from pipeline.normalise import PIXEL_MAX
from pipeline.optim import SGD, learning_rate

log = logging.getLogger(__name__)

# Training from uint8 pixel codes (with the bias trick) pays from this batch size up: the
# gather is bound by memory, and the conversion to float32 is one more call per step. Per
# epoch on the real MNIST, codes against float32 in turns in one process (paired medians):
# batch 1 1.10, 4 1.01, 8 1.05 and 0.89, 16 0.88 and 0.92, 32 0.91 and 0.89, 64 0.91 and
# 0.87, 128 0.86.
CODES_MIN_BATCH = 16


class DivergenceError(PipelineError):
    pass


def fit(be, hp, rng, layers, train_xy, val_xy, num_classes, on_epoch=lambda epoch, row: None):
    """Train `layers` (device arrays) in place; return one row of metrics per epoch."""
    xp = be.xp
    # Work done once, outside the hot loop: images and labels go to the device.
    # 8-bit pixels go as their uint8 codes: each minibatch's gather then reads a quarter of the
    # bytes, and normalise's 1/255 scales the logits and the gradient, not every pixel of the batch.
    codes = pixel_codes(train_xy[0]) if hp.batch_size >= CODES_MIN_BATCH else None
    if codes is not None:  # a constant last pixel for the bias trick (model.gradients): 255 * 1/255
        codes = np.concatenate([codes, np.full((len(codes), 1), PIXEL_MAX, dtype=np.uint8)], axis=1)
    X, labels = _on_device(be, (train_xy[0] if codes is None else codes, train_xy[1]))
    X_val, labels_val = _on_device(be, val_xy)
    classes = be.to_device(np.arange(num_classes)[:, None])
    Y_val = xp.astype(classes == labels_val, xp.float32)  # class-major one-hot targets
    scale = None if codes is None else 1 / PIXEL_MAX
    trained = layers if codes is None else _fold_bias(xp, layers)
    optimizer = SGD(xp, trained, hp.momentum, hp.nesterov, hp.weight_decay)
    n, batch = X.shape[0], hp.batch_size
    history = []
    for epoch in range(1, hp.epochs + 1):
        started = time.perf_counter()
        lr = learning_rate(hp, epoch)
        order = be.to_device(rng.permutation(n))
        # Targets in epoch order, once: each batch's are then a slice. Building the one-hot
        # from the shuffled labels reads far less memory than shuffling a stored one-hot.
        labels_epoch = xp.take(labels, order)
        Y_epoch = xp.astype(classes == labels_epoch, xp.float32)
        batch_logits = []  # kept to score the epoch afterwards in one pass: no per-step metric work
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            # A per-batch gather of the images keeps the copy in cache for the two matrix products.
            images = xp.take(X, order[start:stop], axis=0)
            if codes is not None:
                images = xp.astype(images, xp.float32)
            grads, z = model.gradients(xp, trained, images, Y_epoch[:, start:stop], scale)
            optimizer.step(trained, grads, lr)
            batch_logits.append(z)
        # Train metrics: each image scored by the model as it was when that image was trained on.
        train_loss, train_accuracy = model.scores(
            xp, xp.concat(batch_logits, axis=1), Y_epoch, labels_epoch)
        val_loss, val_accuracy = model.loss_and_accuracy(xp, _unfold_bias(trained), X_val, Y_val, labels_val)
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
        log.info("epoch %d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.2f s)", epoch,
                 row["train/loss"], row["train/accuracy"], row["val/loss"], row["val/accuracy"], seconds)
        history.append(row)
    if trained is not layers:
        (W, b), (W_trained, b_trained) = layers[0], _unfold_bias(trained)[0]
        W[...], b[...] = W_trained, b_trained
    return history


def pixel_codes(images, chunk=2048):
    """uint8 codes k with images == k / PIXEL_MAX (float32) exactly, or None if the
    images are not 8-bit pixels. Gathering minibatches is bound by memory reads: from the
    codes it reads a quarter of the bytes (43 MB for the training set, mostly in
    cache, against 172 MB). Checked in chunks that stay in cache (about 0.1 s for the
    training set)."""
    if images.dtype != np.float32:
        return None
    codes = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        scaled = np.rint(part * np.float32(PIXEL_MAX))
        if not (np.all(scaled >= 0) and np.all(scaled <= PIXEL_MAX)):
            return None
        codes[start:start + chunk] = scaled
        if not np.array_equal(codes[start:start + chunk].astype(np.float32) / np.float32(PIXEL_MAX), part):
            return None
    return codes


def _fold_bias(xp, layers):
    """The first layer as one array [W | b], with bias None (model.gradients)."""
    W, b = layers[0]
    return [(xp.concat([W, b[:, None]], axis=1), None), *layers[1:]]


def _unfold_bias(layers):
    """(W, b) views of layers whose first may be folded, for evaluating them."""
    return [(W[:, :-1], W[:, -1]) if b is None else (W, b) for W, b in layers]


def _on_device(be, split):
    """Images and integer labels of one split, on the device."""
    images, labels = split
    return be.to_device(images), be.to_device(np.asarray(labels, dtype=np.int64))
