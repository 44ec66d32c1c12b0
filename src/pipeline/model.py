"""The models, written against the array API: softmax regression and the MLP.

Softmax regression (the lecture's model) is the network with no hidden layer:

    logits = W x + b          W: (classes, 784), b: (classes,)
    p      = softmax(logits)
    L      = -log p_y         (cross-entropy, averaged over the batch)
    dL/dW  = (p - onehot(y)) x^T / n,   dL/db = mean(p - onehot(y))

Row i of W is the "filter" of class i: logit i is the correlation of that
filter with the image. The MLP puts ReLU layers in front, h = relu(W1 x + b1),
and backpropagates the same (p - onehot(y)) through them.

Images come in as rows (n, 784), as stored; everything after is class-major,
one column per image, as in the formulas: logits, targets and hidden
activations are (units, n). The sums over the 10 classes (softmax, loss,
argmax) then run along axis 0, across contiguous rows, which NumPy does 2-3x
faster than along the short axis 1 of an (n, 10) array, and in the hot loop
of softmax regression these small calls are a large share of each step.

A model is a list of (W, b) layers. Every function takes the array namespace
`xp` first and uses only array-API calls, so NumPy, CuPy and array-api-strict
all run it.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import save_npz

FILE = "model.npz"  # the file name train writes and evaluate/export_filters read


def init_params(rng, sizes):
    """Layers for sizes [784, *hidden, classes], drawn from the host RNG so every
    backend starts identically. Hidden layers: He initialisation (std sqrt(2 /
    fan_in), right for ReLU). Output layer: small weights (std 0.01). Biases 0."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        std = 0.01 if i == len(sizes) - 2 else (2.0 / fan_in) ** 0.5
        W = rng.normal(0.0, std, size=(fan_out, fan_in)).astype(np.float32)
        layers.append((W, np.zeros(fan_out, dtype=np.float32)))
    return layers


def one_hot(labels, num_classes):
    """Host-side float32 targets, class-major (classes, n) like the logits;
    built once per dataset, not per step."""
    return (np.arange(num_classes)[:, None] == np.asarray(labels)).astype(np.float32)


def forward(xp, layers, X, input_scale=None):
    """(input of each layer, class-major logits (classes, n)) for images X (n, 784).
    The inputs are class-major too: the first is a transposed view of X. With
    `input_scale`, the images are X * input_scale (see gradients)."""
    inputs = [X.T]
    scale = input_scale
    for W, b in layers[:-1]:
        z = _affine(W, b, inputs[-1], scale)
        scale = None
        inputs.append(xp.where(z > 0, z, xp.zeros_like(z)))  # ReLU
    W, b = layers[-1]
    return inputs, _affine(W, b, inputs[-1], scale)


def _affine(W, b, A, scale=None):
    z = W @ A
    if scale is not None:  # W (s A) = s (W A): scaling the few outputs, not the many inputs
        z *= scale
    if b is not None:  # None: the bias is W's last column (see gradients)
        z += b[:, None]  # in place: no second (units, n) array
    return z


def softmax(xp, z):
    """Softmax over the classes (axis 0) of class-major logits."""
    # Shifting by the column max keeps exp() finite for huge logits; p is unchanged.
    p = xp.exp(z - xp.max(z, axis=0))
    p /= xp.sum(p, axis=0)
    return p


def cross_entropy(xp, z, onehot):
    """Mean of -log softmax(z)_y, via log-sum-exp so huge logits stay finite."""
    z = z - xp.max(z, axis=0)
    log_norm = xp.log(xp.sum(xp.exp(z), axis=0))
    return xp.mean(log_norm - xp.sum(z * onehot, axis=0))


def gradients(xp, layers, X, onehot, input_scale=None):
    """[(dL/dW, dL/db) per layer] of the mean cross-entropy over the images X
    (n, 784) with class-major targets onehot (classes, n), and the logits (so
    the caller can score the batch without a second pass).

    Two options serve the trainer's 8-bit pixels. With `input_scale` the images
    are X * input_scale: the trainer passes pixel codes (as float32) and 1/255,
    and the scale is applied to the first layer's output and delta, (units, n)
    arrays, instead of a pass over the (n, 784) batch. The first layer given as
    (W, None) has its bias folded into W's last column, the "bias trick": X ends
    in a constant column (the trainer's codes end in 255, which the scale makes
    1), so W x covers W x + b and dL/dW covers dL/db, and a step needs no
    separate bias add, bias-gradient sum or bias update."""
    inputs, z = forward(xp, layers, X, input_scale)
    delta = softmax(xp, z)  # a new array: z stays the logits
    delta -= onehot  # n dL/dlogits = p - onehot(y); each layer's gradient applies the 1/n
    n = X.shape[0]
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        W, b = layers[i]
        grads.append(_layer_gradient(xp, delta, inputs[i], n, input_scale if i == 0 else None, b is None))
        if i:  # through W, then through the ReLU that made inputs[i]
            delta = W.T @ delta
            delta = xp.where(inputs[i] > 0, delta, xp.zeros_like(delta))
    return grads[::-1], z


def _layer_gradient(xp, delta, inputs, n, scale, bias_folded):
    """(dL/dW, dL/db) of one layer from delta = n dL/dz (units, n) and its inputs
    (fan_in, n) times `scale`. For a single sample (the lecture's batch_size=1)
    dL/dW is an outer product, which broadcasting does several times faster than
    a rank-1 matrix product. With the bias folded into W, dL/db is None."""
    weighted = delta * ((1.0 if scale is None else scale) / n)
    grad_W = weighted * inputs.T if n == 1 else weighted @ inputs.T
    if bias_folded:
        return grad_W, None
    per_image = weighted if scale is None else delta * (1.0 / n)  # dL/dz
    return grad_W, (per_image[:, 0] if n == 1 else xp.sum(per_image, axis=1))


def scores(xp, z, onehot, labels):
    """Device scalars (no host sync) of class-major logits z: mean loss and fraction
    classified right. `labels` are the one-hot targets as integers (taking them
    from the one-hot would cost an argmax over the epoch)."""
    hits = xp.argmax(z, axis=0) == labels
    return cross_entropy(xp, z, onehot), xp.mean(xp.astype(hits, xp.float32))


def loss_and_accuracy(xp, layers, X, onehot, labels):
    return scores(xp, forward(xp, layers, X)[1], onehot, labels)


def save(path, layers, config_json):
    """The layers and the resolved training config, as an .npz with no pickled
    objects. One layer (softmax regression) is stored as W and b."""
    names = [("W", "b")] if len(layers) == 1 else [(f"W{i}", f"b{i}") for i in range(len(layers))]
    arrays = {name: array for pair, layer in zip(names, layers) for name, array in zip(pair, layer)}
    save_npz(path, dict(arrays, config=np.array(config_json)))


def load(path):
    """(layers, config dict) of a model written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the train stage first (dvc repro)")
    try:  # allow_pickle=False: a model file must never run code when loaded
        with np.load(path, allow_pickle=False) as npz:
            if "W" in npz:
                layers = [(npz["W"], npz["b"])]
            else:
                layers = [(npz[f"W{i}"], npz[f"b{i}"]) for i in range(len(npz.files) // 2)]
            return layers, json.loads(str(npz["config"]))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"{path}: not a model written by the train stage ({err}); run train again (dvc repro)"
        ) from err
