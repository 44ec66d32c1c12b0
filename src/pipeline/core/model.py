"""The models, written against the array API: softmax regression and the MLP.

Softmax regression, the lecture's model, is the network with no hidden layer:

    logits = W x + b          W: (classes, 784), b: (classes,)
    p      = softmax(logits)
    L      = -log p_y         (cross-entropy, averaged over the batch)
    dL/dW  = (p - onehot(y)) x^T / n,   dL/db = mean(p - onehot(y))

Row i of W is the "filter" of class i: logit i is the correlation of that
filter with the image. The MLP puts ReLU layers in front, h = relu(W1 x + b1),
and backpropagates the same (p - onehot(y)) through them.

Images come in as rows (n, 784), as stored; everything after is class-major,
one column per image, as in the formulas: logits, targets and hidden
activations are (units, n). The sums over the classes then run along axis 0,
across contiguous rows, which NumPy does 2-3x faster than along the short axis
of an (n, 10) array.

A model is a list of (W, b) layers. Every function takes the array namespace
`xp` first and uses only array-API calls, so NumPy, CuPy and array-api-strict
all run it.
"""

import numpy as np


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
    """Host-side class-major float32 targets (classes, n), like the logits."""
    return (np.arange(num_classes)[:, None] == np.asarray(labels)).astype(np.float32)


def forward(xp, layers, X):
    """(input of each layer, class-major logits (classes, n)) for images X (n, 784).
    The first input is a transposed view of X: images become columns, as x in W x."""
    inputs = [X.T]
    for W, b in layers[:-1]:
        # ReLU as maximum: one vectorised pass, 3-6x faster in NumPy than where(z > 0, z, 0)
        inputs.append(xp.maximum(W @ inputs[-1] + b[:, None], 0.0))
    W, b = layers[-1]
    return inputs, W @ inputs[-1] + b[:, None]  # logits = W x + b


def softmax(xp, z):
    """Softmax over the classes (axis 0) of class-major logits."""
    # Shifting by the column max keeps exp() finite for huge logits; p is unchanged.
    p = xp.exp(z - xp.max(z, axis=0))
    return p / xp.sum(p, axis=0)


def cross_entropy(xp, z, onehot):
    """Mean of -log softmax(z)_y, via log-sum-exp so huge logits stay finite."""
    z = z - xp.max(z, axis=0)
    log_norm = xp.log(xp.sum(xp.exp(z), axis=0))
    return xp.mean(log_norm - xp.sum(z * onehot, axis=0))


def gradients(xp, layers, X, onehot):
    """[(dL/dW, dL/db) per layer] of the mean cross-entropy over the images X
    (n, 784) with class-major targets onehot (classes, n), and the logits (so
    the caller can score the batch without a second pass)."""
    inputs, z = forward(xp, layers, X)
    delta = (softmax(xp, z) - onehot) / X.shape[0]  # dL/dlogits = (p - onehot(y)) / n
    grads = []
    last = len(layers) - 1
    for i in range(last, -1, -1):
        # dL/dW = delta x^T. At the output of an MLP delta has only `classes` rows, and
        # OpenBLAS computes (x delta^T)^T 1.6x faster (10 x 128 x 256; not so elsewhere).
        dW = (inputs[i] @ delta.T).T if i == last and i else delta @ inputs[i].T
        grads.append((dW, xp.sum(delta, axis=1)))  # dL/db = sum of delta over the batch
        if i:  # back through W, then through the ReLU that made inputs[i]: times its 0/1 mask
            # (a multiply, 3-4x faster in NumPy than where(inputs[i] > 0, delta, 0))
            delta = (layers[i][0].T @ delta) * xp.astype(inputs[i] > 0, delta.dtype)
    return grads[::-1], z


def scores(xp, z, onehot, labels):
    """Device scalars (no host sync) of class-major logits z: mean loss and the
    fraction classified right."""
    hits = xp.argmax(z, axis=0) == labels
    return cross_entropy(xp, z, onehot), xp.mean(xp.astype(hits, xp.float32))


def loss_and_accuracy(xp, layers, X, onehot, labels):
    return scores(xp, forward(xp, layers, X)[1], onehot, labels)
