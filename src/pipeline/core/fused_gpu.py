"""The fused GPU path (backend cupy): softmax regression, a whole epoch in one kernel launch.

The same lecture as pipeline.core.compiled, one image at a time:

    z      = W x + b                  logits
    p      = softmax(z)
    delta  = p - onehot(y)            dL/dz
    W     <- W - lr * delta x^T       b <- b - lr * delta

with a minibatch's deltas (divided by its size) summed into G = sum delta x^T
and one step of pipeline.core.optim's rule per batch (weight decay on W only,
heavy-ball or Nesterov momentum, the PyTorch convention).

Why one launch per epoch: the array-API code on CuPy pays a few dozen tiny
kernel launches per SGD step (about 0.25 ms per step at batch 128, 0.119 s per
epoch on an H200), while the arithmetic of a step is a few microseconds. So the
loop over the steps moves onto the GPU: one thread block runs the whole epoch,
with W (and its velocity and the batch's gradient) in shared memory, and the
host only hands it the epoch's order (from its RNG, as on every path) and lr.

- `sgd_per_sample` (batch 1): ONE warp. Lane l owns the pixels j = l, l+32, ...
  and only ever reads or writes their columns W[:, j], so the steps need no
  barrier at all: a butterfly of shuffles sums the lanes' partial logits into
  the same z on every lane, each lane takes the softmax itself, and updates its
  own columns (b in registers, the same on every lane). The next image's pixel
  codes are loaded while the current one trains (they do not depend on W).
- `sgd_minibatch` (batch > 1): one block of 1024 threads (32 warps). Per step:
  (1) each warp scores images of the batch with the batch's W (logits, softmax,
  delta into shared memory), barrier; (2) thread j sums its pixel's column of
  G = sum_s delta_s x_s^T over the batch's images in order and, after the
  batch's last chunk, takes the optim step on W[:, j]; barrier. Batches larger
  than CHUNK images go through (1)-(2) in chunks, G kept in shared memory.
- `score` (validation): many blocks, a warp per image.

Each image's loss and hit (argmax z == y) go to an array, averaged by CuPy
after the launch: the training figures are as it trained (each image scored by
the logits of its own step), as on the other paths.

Pixels stay 8-bit codes on the device (x = code / 255, correctly rounded, the
float32 normalise stores): a quarter of the bytes, and a zero pixel skips its
work (about 80% of MNIST's). float32, no fast math (a diverging run must give
NaN/inf, as on the CPU), every sum in a fixed order: the same run gives the same
bits, and it matches NumPy within float32 rounding (tests/test_fused_gpu.py).
"""

import logging

import numpy as np

from pipeline.core import codes

log = logging.getLogger(__name__)

MAX_CLASSES = 16  # the class axis lives in registers: a compile-time bound
WARP = 32
BLOCK = 1024  # threads of the minibatch kernel: 32 warps share one SM
CHUNK = 128  # images per pass of the minibatch kernel (its deltas are CHUNK x classes floats)
SCORE_WARPS = 8  # warps per block of the validation kernel

SOURCE = r"""
// Compiled with -DCLASSES=... -DFEATURES=... -DCHUNK=... (fused_gpu.kernel_options).
#define PER_LANE ((FEATURES + 31) / 32)  // pixels per lane: lane l owns j = l + 32 k
#define FULL 0xffffffffu

// x = code / 255 (pipeline.data.splits.PIXEL_MAX), correctly rounded: the float32 normalise stored.
__device__ __forceinline__ float pixel(unsigned int code) { return __fdiv_rn((float)code, 255.0f); }

// One weight's step, optim.SGD's rule (the PyTorch convention):
//   g <- g + weight_decay * w;  v <- momentum * v + g;  w <- w - lr * (nesterov ? g + momentum * v : v)
// weight_decay is 0 for biases; with momentum 0 it is the lecture's w <- w - lr * g.
__device__ __forceinline__ float sgd(float w, float g, float* v, float lr, float momentum, int nesterov,
                                     float weight_decay) {
    if (weight_decay != 0.0f) g += weight_decay * w;
    if (momentum != 0.0f) {
        *v = momentum * *v + g;
        g = nesterov ? g + momentum * *v : *v;
    }
    return w - lr * g;
}

// Sum over the 32 lanes by a butterfly: every lane gets the same bits (the same additions
// in the same tree), so every lane can take the softmax itself.
__device__ __forceinline__ float warp_sum(float s) {
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(FULL, s, offset);
    return s;
}

// z = W x + b for one image (its codes `x`, PER_LANE per lane) on one warp; W class-major
// (CLASSES, FEATURES) as in model.py, so the lanes read 32 consecutive floats: no bank conflict.
__device__ __forceinline__ void logits(const float* W, const float* b, const unsigned char x[PER_LANE],
                                       int lane, float z[CLASSES]) {
    #pragma unroll
    for (int c = 0; c < CLASSES; ++c) z[c] = 0.0f;
    #pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        int j = lane + 32 * k;
        if (j < FEATURES && x[k]) {  // a zero pixel adds nothing
            float xj = pixel(x[k]);
            #pragma unroll
            for (int c = 0; c < CLASSES; ++c) z[c] += W[c * FEATURES + j] * xj;
        }
    }
    #pragma unroll
    for (int c = 0; c < CLASSES; ++c) z[c] = warp_sum(z[c]) + b[c];
}

// p = softmax(z), shifted by the max as model.softmax; returns -log p_y and sets *hit to
// argmax z == y (the first maximum, as argmax). NaN or inf logits give a NaN loss.
__device__ __forceinline__ float softmax(const float z[CLASSES], int y, float p[CLASSES], float* hit) {
    float top = z[0];
    int best = 0;
    #pragma unroll
    for (int c = 1; c < CLASSES; ++c)
        if (z[c] > top) { top = z[c]; best = c; }
    float total = 0.0f, zy = 0.0f;
    #pragma unroll
    for (int c = 0; c < CLASSES; ++c) {
        p[c] = expf(z[c] - top);
        total += p[c];
        if (c == y) zy = z[c];
    }
    #pragma unroll
    for (int c = 0; c < CLASSES; ++c) p[c] /= total;
    *hit = best == y ? 1.0f : 0.0f;
    return logf(total) - (zy - top);
}

// The pixel codes of image i that `lane` owns.
__device__ __forceinline__ void load_image(const unsigned char* images, int i, int lane, unsigned char x[PER_LANE]) {
    const unsigned char* row = images + (size_t)i * FEATURES;
    #pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        int j = lane + 32 * k;
        x[k] = j < FEATURES ? row[j] : 0;
    }
}

// Per-sample SGD over the whole epoch on one warp (launch: 1 block of 32 threads,
// 2 * CLASSES * FEATURES floats of dynamic shared memory). W, b (and V, vb with momentum)
// are read at the start and written back at the end.
extern "C" __global__ void __launch_bounds__(32)
sgd_per_sample(float* W_out, float* b_out, float* V_out, float* vb_out, const unsigned char* images,
               const int* labels, const int* order, int n, float lr, float momentum, int nesterov,
               float weight_decay, float* losses, float* hits) {
    extern __shared__ float shared[];
    float* W = shared;                        // (CLASSES, FEATURES)
    float* V = shared + CLASSES * FEATURES;   // its velocity
    const int lane = threadIdx.x;
    const bool lecture = momentum == 0.0f && weight_decay == 0.0f;  // only lit pixels' weights move
    // Each lane loads the columns it owns: nobody else touches them, so no barrier is needed.
    for (int c = 0; c < CLASSES; ++c)
        for (int j = lane; j < FEATURES; j += 32) {
            W[c * FEATURES + j] = W_out[c * FEATURES + j];
            V[c * FEATURES + j] = momentum != 0.0f ? V_out[c * FEATURES + j] : 0.0f;
        }
    float b[CLASSES], vb[CLASSES];  // the same values on every lane
    #pragma unroll
    for (int c = 0; c < CLASSES; ++c) { b[c] = b_out[c]; vb[c] = momentum != 0.0f ? vb_out[c] : 0.0f; }

    unsigned char x[PER_LANE], next[PER_LANE];
    int i_next = n > 1 ? order[1] : 0;
    load_image(images, order[0], lane, x);
    int y = labels[order[0]];
    for (int t = 0; t < n; ++t) {
        // Ask for the next image now: its loads run while this one trains.
        int y_next = 0, i_after = t + 2 < n ? order[t + 2] : 0;
        if (t + 1 < n) { load_image(images, i_next, lane, next); y_next = labels[i_next]; }

        float z[CLASSES], p[CLASSES], delta[CLASSES], hit;
        logits(W, b, x, lane, z);
        float loss = softmax(z, y, p, &hit);
        if (lane == 0) { losses[t] = loss; hits[t] = hit; }
        #pragma unroll
        for (int c = 0; c < CLASSES; ++c) delta[c] = p[c] - (c == y ? 1.0f : 0.0f);  // dL/dz, batch of 1

        #pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {  // W[:, j] <- W[:, j] - lr * delta x_j, on the lane's columns
            int j = lane + 32 * k;
            if (j < FEATURES && (x[k] || !lecture)) {
                float xj = pixel(x[k]);
                #pragma unroll
                for (int c = 0; c < CLASSES; ++c) {
                    int q = c * FEATURES + j;
                    W[q] = sgd(W[q], delta[c] * xj, &V[q], lr, momentum, nesterov, weight_decay);
                }
            }
        }
        #pragma unroll
        for (int c = 0; c < CLASSES; ++c) b[c] = sgd(b[c], delta[c], &vb[c], lr, momentum, nesterov, 0.0f);

        #pragma unroll
        for (int k = 0; k < PER_LANE; ++k) x[k] = next[k];
        y = y_next;
        i_next = i_after;
    }
    for (int c = 0; c < CLASSES; ++c)
        for (int j = lane; j < FEATURES; j += 32) {
            W_out[c * FEATURES + j] = W[c * FEATURES + j];
            if (momentum != 0.0f) V_out[c * FEATURES + j] = V[c * FEATURES + j];
        }
    if (lane == 0)
        for (int c = 0; c < CLASSES; ++c) { b_out[c] = b[c]; if (momentum != 0.0f) vb_out[c] = vb[c]; }
}

// Minibatch SGD over the whole epoch on one block (launch: 1 block of blockDim threads, a
// multiple of 32 with at least CLASSES; dynamic shared memory: minibatch_shared_bytes).
extern "C" __global__ void __launch_bounds__(1024)
sgd_minibatch(float* W_out, float* b_out, float* V_out, float* vb_out, const unsigned char* images,
              const int* labels, const int* order, int n, int batch, float lr, float momentum,
              int nesterov, float weight_decay, float* losses, float* hits) {
    extern __shared__ float shared[];
    float* W = shared;                          // (CLASSES, FEATURES), class-major
    float* V = W + CLASSES * FEATURES;          // its velocity
    float* G = V + CLASSES * FEATURES;          // the batch's gradient so far (batches over CHUNK)
    float* delta = G + CLASSES * FEATURES;      // (CLASSES, CHUNK): dL/dz of the chunk's images
    float* b = delta + CLASSES * CHUNK;
    float* vb = b + CLASSES;
    float* gb = vb + CLASSES;
    int* rows = (int*)(gb + CLASSES);           // (CHUNK,) the chunk's image indices
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;

    for (int q = tid; q < CLASSES * FEATURES; q += blockDim.x) {
        W[q] = W_out[q];
        V[q] = momentum != 0.0f ? V_out[q] : 0.0f;
    }
    if (tid < CLASSES) { b[tid] = b_out[tid]; vb[tid] = momentum != 0.0f ? vb_out[tid] : 0.0f; }
    __syncthreads();

    for (int start = 0; start < n; start += batch) {
        const int size = min(batch, n - start);
        for (int chunk = 0; chunk < size; chunk += CHUNK) {
            const int m = min(CHUNK, size - chunk);
            const bool last = chunk + m == size;
            // (1) Score the chunk's images with the batch's W, a warp per image.
            for (int s = warp; s < m; s += warps) {
                const int t = start + chunk + s, i = order[t], y = labels[i];
                unsigned char x[PER_LANE];
                load_image(images, i, lane, x);
                float z[CLASSES], p[CLASSES], hit;
                logits(W, b, x, lane, z);
                float loss = softmax(z, y, p, &hit);
                if (lane == 0) {
                    losses[t] = loss;
                    hits[t] = hit;
                    rows[s] = i;
                    #pragma unroll
                    for (int c = 0; c < CLASSES; ++c)  // dL/dz of the batch's mean loss
                        delta[c * CHUNK + s] = (p[c] - (c == y ? 1.0f : 0.0f)) / size;
                }
            }
            __syncthreads();
            // (2) G[:, j] += sum_s delta_s x_sj, thread j for pixel j, images in batch order; after
            // the batch's last chunk the step on W[:, j]. Only thread j touches column j of W, V, G.
            for (int j = tid; j < FEATURES; j += blockDim.x) {
                float g[CLASSES];
                #pragma unroll
                for (int c = 0; c < CLASSES; ++c) g[c] = chunk ? G[c * FEATURES + j] : 0.0f;
                #pragma unroll 4
                for (int s = 0; s < m; ++s) {
                    unsigned int code = images[(size_t)rows[s] * FEATURES + j];
                    if (code) {  // a zero pixel adds nothing to its column
                        float xj = pixel(code);
                        #pragma unroll
                        for (int c = 0; c < CLASSES; ++c) g[c] += delta[c * CHUNK + s] * xj;
                    }
                }
                #pragma unroll
                for (int c = 0; c < CLASSES; ++c) {
                    int q = c * FEATURES + j;
                    if (last) W[q] = sgd(W[q], g[c], &V[q], lr, momentum, nesterov, weight_decay);
                    else G[q] = g[c];
                }
            }
            if (tid < CLASSES) {  // the bias's gradient: sum_s delta_s, then its step (no weight decay)
                float g = chunk ? gb[tid] : 0.0f;
                for (int s = 0; s < m; ++s) g += delta[tid * CHUNK + s];
                if (last) b[tid] = sgd(b[tid], g, &vb[tid], lr, momentum, nesterov, 0.0f);
                else gb[tid] = g;
            }
            __syncthreads();  // the next chunk or step reads the new W and b, and rewrites delta
        }
    }
    for (int q = tid; q < CLASSES * FEATURES; q += blockDim.x) {
        W_out[q] = W[q];
        if (momentum != 0.0f) V_out[q] = V[q];
    }
    if (tid < CLASSES) { b_out[tid] = b[tid]; if (momentum != 0.0f) vb_out[tid] = vb[tid]; }
}

// Loss and hit of every image of a split: a warp per image (launch: any grid of blocks of
// whole warps covering n images); W and b from global memory (read by every warp: cached).
extern "C" __global__ void
score(const float* W, const float* b, const unsigned char* images, const int* labels, int n,
      float* losses, float* hits) {
    const int lane = threadIdx.x % 32;
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (i >= n) return;  // whole warps leave together: the shuffles see all 32 lanes
    unsigned char x[PER_LANE];
    load_image(images, i, lane, x);
    float z[CLASSES], p[CLASSES], hit;
    logits(W, b, x, lane, z);
    float loss = softmax(z, labels[i], p, &hit);
    if (lane == 0) { losses[i] = loss; hits[i] = hit; }
}
"""

KERNELS = ("sgd_per_sample", "sgd_minibatch", "score")


def kernel_options(num_classes, features):
    """NVRTC options: the shapes as compile-time constants (the loops over classes and a
    lane's pixels unroll, z and p stay in registers). No --use_fast_math: NaN must show."""
    return (f"-DCLASSES={num_classes}", f"-DFEATURES={features}", f"-DCHUNK={CHUNK}")


def per_sample_shared_bytes(num_classes, features):
    return 2 * num_classes * features * 4  # W and V


def minibatch_shared_bytes(num_classes, features):
    # W, V, G; delta (classes, CHUNK); b, vb, gb; rows (CHUNK,) int32
    return (3 * num_classes * features + num_classes * CHUNK + 3 * num_classes + CHUNK) * 4


def applies(layers, num_classes):
    """Softmax regression (one layer) with classes that fit the registers."""
    return len(layers) == 1 and num_classes <= MAX_CLASSES


def epochs(hp, layers, train_xy, val_xy, num_classes):
    """epoch(order, lr) -> (train loss, accuracy as it trained, val loss, val accuracy) as CuPy
    scalars, training `layers` (CuPy arrays) in place, one launch per epoch; or None where the
    path does not apply (the MLP, or images that are not 8-bit pixels k / 255)."""
    if not applies(layers, num_classes):
        return None
    found = codes.pixel_codes_of_splits(train_xy[0], val_xy[0])
    if found is None:
        log.info("backend cupy: the images are not 8-bit pixels; training on the array-API path")
        return None
    train_codes, val_codes = found
    import cupy  # after the checks above (which need no GPU): only backend cupy gets here
    ((W, b),) = layers
    if not (W.dtype == b.dtype == np.float32 and W.flags.c_contiguous and b.flags.c_contiguous):
        return None  # the kernels read and write the layers' own buffers
    classes, features = W.shape
    module = cupy.RawModule(code=SOURCE, options=kernel_options(classes, features))
    module.compile()  # compiling (or loading CuPy's kernel cache) is setup, not the first epoch's time
    per_sample, minibatch, score = (module.get_function(name) for name in KERNELS)
    per_sample.max_dynamic_shared_size_bytes = per_sample_shared_bytes(classes, features)
    minibatch.max_dynamic_shared_size_bytes = minibatch_shared_bytes(classes, features)

    # Work done once: the splits go to the device as uint8 codes, labels as int32.
    images, val_images = cupy.asarray(train_codes), cupy.asarray(val_codes)
    labels, val_labels = (cupy.asarray(np.asarray(y, dtype=np.int32)) for y in (train_xy[1], val_xy[1]))
    n, n_val, batch = len(train_codes), len(val_codes), hp.batch_size
    V, vb = cupy.zeros_like(W), cupy.zeros_like(b)  # the velocity, kept across epochs
    losses, hits = cupy.empty(n, np.float32), cupy.empty(n, np.float32)
    val_losses, val_hits = cupy.empty(n_val, np.float32), cupy.empty(n_val, np.float32)
    f32 = np.float32
    momentum, nesterov, weight_decay = f32(hp.momentum), np.int32(bool(hp.nesterov)), f32(hp.weight_decay)

    def epoch(host_order, lr):
        order = cupy.asarray(np.asarray(host_order, dtype=np.int32))
        common = (W, b, V, vb, images, labels, order, np.int32(n))
        optimizer = (f32(lr), momentum, nesterov, weight_decay, losses, hits)
        if batch == 1:
            per_sample((1,), (WARP,), common + optimizer, shared_mem=per_sample_shared_bytes(classes, features))
        else:
            minibatch((1,), (BLOCK,), common + (np.int32(batch),) + optimizer,
                      shared_mem=minibatch_shared_bytes(classes, features))
        blocks = (n_val + SCORE_WARPS - 1) // SCORE_WARPS
        score((blocks,), (SCORE_WARPS * WARP,), (W, b, val_images, val_labels, np.int32(n_val), val_losses,
                                                  val_hits))
        return losses.mean(), hits.mean(), val_losses.mean(), val_hits.mean()

    return epoch

