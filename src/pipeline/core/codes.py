"""The speed path: softmax regression trained from 8-bit pixel codes.

normalise stores each pixel as k / 255 in float32, k an 8-bit code. Gathering
a shuffled minibatch is bound by memory reads; from the uint8 codes it reads a
quarter of the bytes (43 MB for the training set instead of 172 MB, mostly in
cache). The 1/255 is then applied to the (classes, n) logits and gradient, not
to every pixel of the (n, 784) batch, since W (s c) = s (W c).

The trainer takes this path when backend.fast is true (the default) and
`applies` says so; tests/test_codes.py checks it against model.gradients.
Measured by benchmarks/bench_peers.py (figures in benchmarks/README.md): an epoch
at batch 128 takes about 0.9 of the plain path's time. MIN_BATCH comes from an
earlier measurement, before the restructuring.
"""

import numpy as np

from pipeline.core import model
from pipeline.data.splits import PIXEL_MAX

MIN_BATCH = 16


def applies(layers, batch_size):
    """Softmax regression (one layer) at a batch size where the codes pay. The MLP's
    time goes into its hidden layer, which the codes do not make cheaper."""
    return len(layers) == 1 and batch_size >= MIN_BATCH


def pixel_codes(images, chunk=2048):
    """uint8 codes k with images == k / PIXEL_MAX (float32) exactly, or None if the
    images are not 8-bit pixels. Checked in chunks that stay in cache (about 0.1 s
    for the training set)."""
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


def pixel_codes_of_splits(*splits):
    """[pixel_codes of each split's images], or None as soon as one is not 8-bit pixels:
    the compiled and fused paths train on codes, both splits or neither."""
    found = []
    for images in splits:
        if (split_codes := pixel_codes(images)) is None:
            return None
        found.append(split_codes)
    return found


def gradients(xp, layers, codes, onehot):
    """model.gradients of softmax regression for the images codes / PIXEL_MAX,
    computed from the uint8 codes (n, 784) of a minibatch."""
    ((W, b),) = layers
    c = xp.astype(codes, xp.float32)
    scale = 1.0 / PIXEL_MAX
    z = (W @ c.T) * scale + b[:, None]  # logits = W x + b with x = c / 255
    delta = (model.softmax(xp, z) - onehot) / c.shape[0]
    return [((delta * scale) @ c, xp.sum(delta, axis=1))], z  # dL/dW = delta x^T
