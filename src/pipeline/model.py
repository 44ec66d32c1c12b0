"""Softmax regression, the lecture's model, written against the array API.

    logits = x W^T + b        W: (classes, 784), b: (classes,)
    p      = softmax(logits)
    L      = -log p_y         (cross-entropy, averaged over the batch)
    dL/dW  = (p - onehot(y))^T x / n,   dL/db = mean(p - onehot(y))

Row i of W is the "filter" of class i: logit i is the correlation of that
filter with the image. Every function takes the array namespace `xp` first
and uses only array-API calls, so NumPy, CuPy and array-api-strict all run it.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import save_npz

FILE = "model.npz"  # the file name train writes and evaluate/export_filters read


def init_params(rng, num_classes, num_features):
    """Small random W (host RNG, so every backend starts identically), zero b."""
    W = rng.normal(0.0, 0.01, size=(num_classes, num_features)).astype(np.float32)
    return W, np.zeros(num_classes, dtype=np.float32)


def one_hot(labels, num_classes):
    """Host-side float32 one-hot rows, built once per dataset, not per step."""
    return (np.asarray(labels)[:, None] == np.arange(num_classes)).astype(np.float32)


def logits(xp, W, b, X):
    return X @ xp.matrix_transpose(W) + b


def softmax(xp, z):
    # Shifting by the row max keeps exp() finite for huge logits; p is unchanged.
    z = z - xp.max(z, axis=1, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=1, keepdims=True)


def cross_entropy(xp, z, onehot):
    """Mean of -log softmax(z)_y, via log-sum-exp so huge logits stay finite."""
    z = z - xp.max(z, axis=1, keepdims=True)
    log_norm = xp.log(xp.sum(xp.exp(z), axis=1))
    return xp.mean(log_norm - xp.sum(z * onehot, axis=1))


def gradients(xp, W, b, X, onehot):
    """(dL/dW, dL/db) of the mean cross-entropy over the batch X."""
    delta = (softmax(xp, logits(xp, W, b, X)) - onehot) / X.shape[0]  # p - onehot(y)
    return xp.matrix_transpose(delta) @ X, xp.sum(delta, axis=0)


def sgd_step(xp, W, b, X, onehot, lr):
    """One SGD update, in place: W -= lr dL/dW, b -= lr dL/db."""
    grad_W, grad_b = gradients(xp, W, b, X, onehot)
    W -= lr * grad_W
    b -= lr * grad_b


def loss_and_accuracy(xp, W, b, X, onehot):
    """Device scalars (no host sync): mean loss and fraction classified right."""
    z = logits(xp, W, b, X)
    hits = xp.argmax(z, axis=1) == xp.argmax(onehot, axis=1)
    return cross_entropy(xp, z, onehot), xp.mean(xp.astype(hits, xp.float32))


def save(path, W, b, config_json):
    """W, b and the resolved training config, as an .npz with no pickled objects."""
    save_npz(path, {"W": W, "b": b, "config": np.array(config_json)})


def load(path):
    """(W, b, config dict) of a model written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the train stage first (dvc repro)")
    try:  # allow_pickle=False: a model file must never run code when loaded
        with np.load(path, allow_pickle=False) as npz:
            return npz["W"], npz["b"], json.loads(str(npz["config"]))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"{path}: not a model written by the train stage ({err}); run train again (dvc repro)"
        ) from err
