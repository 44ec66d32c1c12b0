"""The compiled path (backend numba): softmax regression, a whole epoch in Numba loops.

The same lecture, one image at a time, as on the slide:

    z      = W x + b                  logits
    p      = softmax(z)
    delta  = p - onehot(y)            dL/dz
    W     <- W - lr * delta x^T       b <- b - lr * delta

With a minibatch the deltas of its images (divided by the batch size) add up
into G = sum delta x^T, and the step, exactly pipeline.core.optim's (weight
decay, heavy-ball or Nesterov momentum), is taken once per batch. The epoch
order comes from the host RNG as on the array-API path, so both train on the
same images in the same order and end within float32 rounding of each other
(tests/test_compiled.py).

Where the speed comes from (figures in benchmarks/README.md):

- Only lit pixels do work. A pixel x_j = 0 adds nothing to W x and its column of
  delta x^T is 0, so the loops run over each image's nonzero pixels (about 19%
  of MNIST's), kept as a compact list (`lit_pixels`: the column index and the
  8-bit code of each, the value code / 255 read from a 256-entry table, the
  exact float32 that normalise stores). Same arithmetic, a fifth of the work.
- W is stored transposed and padded, Wt (784, LANES) with LANES = 16 >= the
  classes: pixel j's weights for all classes are one contiguous 64-byte row, so
  `z += x_j Wt[j]` and `G[j] += x_j delta` are one AVX-512 vector operation
  each (`add_scaled`, written as LLVM vector code: Numba's loops over 16 lanes
  stayed scalar or went through memory), with z and delta kept in registers
  (`_registers`). No reduction, so no fastmath. The padding lanes stay 0 (their
  delta is 0). trainer.fit copies W and b back after every epoch.
- The images come in shuffled order, so each one's pixel list is a cache miss:
  the loop asks for the list AHEAD images ahead (`_prefetch`).
- Unsigned indices (uint64 offsets, uint16 columns): Numba then skips the
  negative-index wraparound on every access of the inner loops.
- Per-sample SGD (batch 1, no momentum or weight decay) updates the lit rows
  directly; any other setup accumulates G over the batch and takes one dense
  step per batch.

No fastmath: the loss must turn into NaN/inf when training diverges (fastmath
lets LLVM assume it never does), and the vector code needs no reassociation.
The vectors are LLVM's <16 x float>: on a CPU without AVX-512 LLVM splits them
into AVX2 or SSE (or NEON) operations, so the same code runs anywhere Numba does.
`cache=True`: the machine code is kept in __pycache__ beside this file, so only
the first process compiles (see benchmarks/bench_peers.py for both times).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # the class axis, padded: one AVX-512 register of float32
PIXEL_MAX = 255  # == pipeline.data.splits.PIXEL_MAX (tests/test_compiled.py checks it)
PIXEL = (np.arange(PIXEL_MAX + 1, dtype=np.float32) / np.float32(PIXEL_MAX)).astype(np.float32)  # code -> value
AHEAD = 8  # the training loop asks for the pixels of the image this many steps ahead


def applies(layers, num_classes):
    """Softmax regression (one layer) with classes that fit the lanes and pixel
    columns that fit uint16."""
    return len(layers) == 1 and num_classes <= LANES and layers[0][0].shape[1] < 2 ** 16


class Images:
    """A split as its lit pixels: those of image i are column[k], code[k] for k in
    indptr[i]..indptr[i + 1]."""

    def __init__(self, pixel_codes):
        self.indptr, self.column, self.code = lit_pixels(pixel_codes)
        self.n, self.features = pixel_codes.shape


class Model:
    """Wt (features, LANES) and b (LANES,) padded, with the optimizer's buffers."""

    def __init__(self, W, b, momentum):
        classes, features = W.shape
        self.classes = classes
        self.Wt = np.zeros((features, LANES), np.float32)
        self.Wt[:, :classes] = W.T
        self.b = np.zeros(LANES, np.float32)
        self.b[:classes] = b
        self.G, self.gb = np.zeros_like(self.Wt), np.zeros_like(self.b)  # the batch's gradient
        # Velocity buffers only with momentum (size-0 arrays otherwise: the kernels never touch them).
        shape = self.Wt.shape if momentum else (0, LANES)
        self.V, self.vb = np.zeros(shape, np.float32), np.zeros(LANES if momentum else 0, np.float32)

    def copy_to(self, W, b):
        W[...] = self.Wt[:, :self.classes].T
        b[...] = self.b[:self.classes]


def train_epoch(model, images, labels, order, batch, lr, momentum, nesterov, weight_decay):
    """One epoch of SGD in the given order; (mean training loss, accuracy) as it trained."""
    return _train_epoch(model.Wt, model.b, model.G, model.gb, model.V, model.vb, images.indptr, images.column,
                        images.code, PIXEL, labels, order, model.classes, batch, np.float32(lr),
                        np.float32(momentum), nesterov, np.float32(weight_decay))


def evaluate(model, images, labels):
    """(mean loss, accuracy) of the model on a split."""
    return _evaluate(model.Wt, model.b, images.indptr, images.column, images.code, PIXEL, labels, model.classes)


def warm_up():
    """Compile the kernels (or load them from the cache) on a tiny problem, so that no
    epoch's time includes it."""
    images, labels = Images(np.ones((2, 3), np.uint8)), np.zeros(2, np.int64)
    model = Model(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), 0.0)
    train_epoch(model, images, labels, np.arange(2), 1, 0.0, 0.0, False, 0.0)
    evaluate(model, images, labels)


@njit(cache=True)
def lit_pixels(codes):
    """(indptr, column, code) of the nonzero pixels of uint8 codes (n, features), row by row."""
    n, features = codes.shape
    indptr = np.zeros(n + 1, np.uint64)
    for i in range(n):
        lit = 0
        for j in range(features):
            lit += codes[i, j] != 0
        indptr[i + 1] = indptr[i] + lit
    column, code = np.empty(indptr[n], np.uint16), np.empty(indptr[n], np.uint8)
    for i in range(n):
        k = indptr[i]
        for j in range(features):
            if codes[i, j] != 0:
                column[k], code[k] = j, codes[i, j]
                k += np.uint64(1)
    return indptr, column, code


@njit(cache=True)
def _train_epoch(Wt, b, G, gb, V, vb, indptr, column, code, pixel, labels, order, classes, batch, lr,
                 momentum, nesterov, weight_decay):
    z, p, delta = _registers(), _registers(), _registers()
    for c in range(LANES):
        delta[c] = 0  # lanes past the classes stay 0: their weights never move
    lecture = batch == 1 and momentum == 0 and weight_decay == 0
    n, loss, hits = order.shape[0], 0.0, 0
    for start in range(0, n, batch):
        size = min(batch, n - start)
        for t in range(start, start + size):
            _prefetch_image(indptr, column, code, order, t + AHEAD)
            i = order[t]
            y, lo, hi = labels[i], indptr[i], indptr[i + 1]
            _logits(Wt, b, column, code, pixel, lo, hi, z)  # every image of a batch sees the batch's W
            sample_loss, hit = _softmax(z, y, classes, p)
            loss += sample_loss
            hits += hit
            for c in range(classes):
                delta[c] = (p[c] - (c == y)) / size  # dL/dz of the batch's mean loss
            if lecture:  # W <- W - lr delta x^T, b <- b - lr delta: only the lit pixels' rows move
                for k in range(lo, hi):
                    add_scaled(Wt, column[k], -lr * pixel[code[k]], delta, 0)  # W[:, j] -= lr x_j delta
                add_scaled(b, 0, -lr, delta, 0)
            else:  # G += delta x^T, gb += delta
                for k in range(lo, hi):
                    add_scaled(G, column[k], pixel[code[k]], delta, 0)  # G[:, j] += x_j delta
                add_scaled(gb, 0, np.float32(1), delta, 0)
        if not lecture:
            _step(Wt, b, G, gb, V, vb, lr, momentum, nesterov, weight_decay)
    return loss / n, hits / n


@njit(cache=True)
def _evaluate(Wt, b, indptr, column, code, pixel, labels, classes):
    z, p = _registers(), _registers()
    n, loss, hits = labels.shape[0], 0.0, 0
    for i in range(n):
        _logits(Wt, b, column, code, pixel, indptr[i], indptr[i + 1], z)
        sample_loss, hit = _softmax(z, labels[i], classes, p)
        loss += sample_loss
        hits += hit
    return loss / n, hits / n


@njit(cache=True)
def _logits(Wt, b, column, code, pixel, lo, hi, z):
    """z = W x + b, summed over the lit pixels lo..hi of one image."""
    for c in range(LANES):
        z[c] = b[c]
    for k in range(lo, hi):
        add_scaled(z, 0, pixel[code[k]], Wt, column[k])  # z += x_j W[:, j]


@njit(cache=True)
def _softmax(z, y, classes, p):
    """p = softmax(z) over the classes; (cross-entropy -log p_y, 1 if argmax z == y else 0).
    Shifted by the max as model.softmax; NaN or inf logits give a NaN loss."""
    top, best = z[0], 0
    for c in range(1, classes):
        if z[c] > top:  # the first maximum, as argmax
            top, best = z[c], c
    total = np.float32(0)
    for c in range(classes):
        p[c] = np.exp(z[c] - top)
        total += p[c]
    for c in range(classes):
        p[c] /= total
    return np.log(total) - (z[y] - top), best == y


@njit(cache=True)
def _step(Wt, b, G, gb, V, vb, lr, momentum, nesterov, weight_decay):
    """optim.SGD.step on every weight from the batch's gradient (G, gb), which it then zeroes."""
    _update(Wt.reshape(-1), G.reshape(-1), V.reshape(-1), lr, momentum, nesterov, weight_decay)
    _update(b, gb, vb, lr, momentum, nesterov, np.float32(0))  # no weight decay on biases


@njit(cache=True)
def _update(w, g, v, lr, momentum, nesterov, weight_decay):
    for q in range(w.shape[0]):
        grad = g[q]
        if weight_decay:
            grad += weight_decay * w[q]
        if momentum:
            v[q] = momentum * v[q] + grad
            grad = grad + momentum * v[q] if nesterov else v[q]
        w[q] -= lr * grad
        g[q] = 0


@njit(cache=True)
def _prefetch_image(indptr, column, code, order, t):
    """Ask the memory for the pixels of the image at step t (and for where those of
    step t + AHEAD lie): in shuffled order each image's are a cache miss."""
    n = order.shape[0]
    if t + AHEAD < n:
        _prefetch(indptr, order[t + AHEAD])
    if t < n:
        i = order[t]
        lo, hi = indptr[i], indptr[i + 1]
        for k in range(lo, hi, np.uint64(32)):  # a 64-byte cache line holds 32 columns, 64 codes
            _prefetch(column, k)
            if (k - lo) % np.uint64(64) == 0:
                _prefetch(code, k)


# What Numba does not write by itself: LLVM keeps a heap array's values in memory,
# does not vectorise the 16-lane updates across the loop over pixels and does not
# know that a row of Wt is LANES floats long, so these write the code directly.

@intrinsic
def _stack_pointer(typingctx, size):
    """A float32 buffer of a constant size on the stack, which LLVM keeps in registers."""
    if not isinstance(size, types.IntegerLiteral):
        raise numba.core.errors.RequireLiteralValue(size)

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=size.literal_value)

    return types.CPointer(types.float32)(size), codegen


@njit(cache=True, inline="always")
def _registers():
    """LANES float32 values, for one image's z, p and delta."""
    return numba.carray(_stack_pointer(LANES), LANES)


@intrinsic
def add_scaled(typingctx, dst, i, a, src, j):
    """dst[i] += a * src[j] as one vector operation on LANES float32: dst and src are
    C-contiguous float32 arrays of rows of LANES (Wt, G), or of LANES values with row 0
    (b, gb, _registers()). No bounds check: the callers' rows exist."""
    def codegen(context, builder, signature, args):
        dst_type, i_type, a_type, src_type, j_type = signature.args
        vector = ir.VectorType(ir.FloatType(), LANES)

        def row(array_type, array, index_type, index):
            data = context.make_array(array_type)(context, builder, array).data
            offset = builder.mul(context.cast(builder, index, index_type, types.intp), ir.IntType(64)(LANES))
            return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())

        target, source = row(dst_type, args[0], i_type, args[1]), row(src_type, args[3], j_type, args[4])
        scalar = context.cast(builder, args[2], a_type, types.float32)
        splat = builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.IntType(32)(0))
        splat = builder.shuffle_vector(splat, ir.Constant(vector, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
        total = builder.fadd(builder.load(target, align=4), builder.fmul(splat, builder.load(source, align=4)))
        builder.store(total, target, align=4)
        return context.get_dummy_value()

    return types.void(dst, i, a, src, j), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """A hint to load array[index]'s cache line (llvm.prefetch: read, keep in all caches)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]), "llvm.prefetch.p0")
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        builder.call(prefetch, [builder.bitcast(builder.gep(data, [index]), byte), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen
