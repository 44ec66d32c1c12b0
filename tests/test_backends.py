"""One core for every backend: NumPy, array-api-strict (a stand-in accelerator
that refuses host/device mixing and, on `no_float64`, float64), and CuPy when a
GPU is visible."""

import array_api_strict
import numpy as np
import pytest

from pipeline.core import backend, codes, model
from pipeline.core.backend import Backend
from pipeline.core.hparams import Hyperparams
from pipeline.core.optim import SGD
from pipeline.core.trainer import fit
from pipeline.errors import PipelineError

NUMPY = Backend("numpy", np)
STRICT = {dev: Backend("array_api_strict", array_api_strict, array_api_strict.Device(dev))
          for dev in ("device1", "no_float64")}


def _data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=n)
    X[np.arange(n)[:, None], (y * 70)[:, None] + np.arange(30)] += 2.0  # a learnable signal
    return X, y


def _eight_bit(X):
    """The images as normalise writes pixels, k / 255: fit then gathers from uint8 codes."""
    X = np.rint(np.clip(X / 3, 0, 1) * 255).astype(np.uint8).astype(np.float32) / np.float32(codes.PIXEL_MAX)
    assert codes.pixel_codes(X) is not None
    return X


def _hp(**overrides):
    hp = dict(lr=0.1, epochs=2, batch_size=32, momentum=0.9, nesterov=True, weight_decay=1e-4,
              schedule="cosine", step_epochs=1, gamma=0.5)
    return Hyperparams(**dict(hp, **overrides))


def _host_layers(be, layers):
    return [(be.to_host(W), be.to_host(b)) for W, b in layers]


def _count_calls(monkeypatch, module):
    """Count the calls of module.gradients (fit looks it up when it starts)."""
    calls, original = [], module.gradients

    def spy(xp, layers, images, onehot):
        calls.append(images.shape)
        return original(xp, layers, images, onehot)

    monkeypatch.setattr(module, "gradients", spy)
    return calls


@pytest.mark.parametrize("device", STRICT)
@pytest.mark.parametrize("hidden", [[], [32]])
@pytest.mark.parametrize("n", [1, 16])
def test_gradients_and_step_on_strict_equal_numpy(device, hidden, n):
    be = STRICT[device]
    X, y = _data()
    onehot = model.one_hot(y, 10)
    init = model.init_params(np.random.default_rng(1), [784, *hidden, 10])
    results = []
    for b in (NUMPY, be):
        layers = [(b.to_device(W.copy()), b.to_device(bias.copy())) for W, bias in init]
        grads, z = model.gradients(b.xp, layers, b.to_device(X[:n]), b.to_device(onehot[:, :n]))
        assert z.dtype == b.xp.float32 and z.shape == (10, n)
        SGD(b.xp, layers, momentum=0.9, nesterov=True, weight_decay=1e-3).step(layers, grads, 0.05)
        results.append((_host_layers(b, grads), _host_layers(b, layers)))
    (g_np, p_np), (g_st, p_st) = results
    for a, c in zip(sum(g_np + p_np, ()), sum(g_st + p_st, ()), strict=True):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("device", STRICT)
def test_code_gradients_on_strict_equal_numpy(device):
    be = STRICT[device]
    X, y = _data(n=codes.MIN_BATCH)
    pixel_codes = codes.pixel_codes(_eight_bit(X))
    onehot = model.one_hot(y, 10)
    rng = np.random.default_rng(2)
    init = [(rng.normal(0, 0.01, (10, 784)).astype(np.float32), rng.normal(0, 0.1, 10).astype(np.float32))]
    results = []
    for b in (NUMPY, be):
        layers = [(b.to_device(W), b.to_device(bias)) for W, bias in init]
        grads, z = codes.gradients(b.xp, layers, b.to_device(pixel_codes), b.to_device(onehot))
        assert z.dtype == b.xp.float32
        results.append((_host_layers(b, grads), be.to_host(z) if b is be else z))
    (g_np, z_np), (g_st, z_st) = results
    np.testing.assert_array_equal(z_np, z_st)
    for a, c in zip(sum(g_np, ()), sum(g_st, ()), strict=True):
        np.testing.assert_array_equal(a, c)


def test_strict_gradient_matches_finite_differences_in_float64():
    be = Backend("array_api_strict", array_api_strict, array_api_strict.Device("device1"))
    xp = be.xp
    X, y = _data(n=4)
    rng = np.random.default_rng(3)
    layers_np = [(rng.normal(0, 0.1, (8, 784)), np.zeros(8)), (rng.normal(0, 0.1, (10, 8)), np.zeros(10))]
    onehot = model.one_hot(y, 10).astype(np.float64)
    layers = [(be.to_device(W), be.to_device(b)) for W, b in layers_np]
    Xd, Yd = be.to_device(X.astype(np.float64)), be.to_device(onehot)
    grads, _ = model.gradients(xp, layers, Xd, Yd)
    eps = 1e-6
    for (layer, i, j) in [(0, 0, 100), (0, 7, 600), (1, 3, 5), (1, 9, 0)]:
        def loss_with(delta):
            changed = [(be.to_device(W.copy()), be.to_device(b)) for W, b in layers_np]
            W = layers_np[layer][0].copy()
            W[i, j] += delta
            changed[layer] = (be.to_device(W), changed[layer][1])
            return float(model.cross_entropy(xp, model.forward(xp, changed, Xd)[1], Yd))
        numeric = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
        assert numeric == pytest.approx(float(be.to_host(grads[layer][0])[i, j]), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("device", STRICT)
@pytest.mark.parametrize("hidden, pixels", [([], "8-bit"), ([32], "float")], ids=["softmax-codes", "mlp-float"])
def test_a_short_training_run_on_strict_equals_numpy(device, hidden, pixels, monkeypatch):
    be = STRICT[device]
    X, y = _data(n=1300)
    if pixels == "8-bit":
        X = _eight_bit(X)
    hp = _hp(batch_size=codes.MIN_BATCH, epochs=4)  # big enough batches for fit to gather from the codes
    train_xy, val_xy = (X[:1200], y[:1200]), (X[1200:], y[1200:])
    code_steps = _count_calls(monkeypatch, codes)
    runs = []
    for b in (NUMPY, be):
        rng = np.random.default_rng(0)
        layers = [(b.to_device(W), b.to_device(bias)) for W, bias in model.init_params(rng, [784, *hidden, 10])]
        history = fit(b, hp, rng, layers, train_xy, val_xy, 10)
        runs.append((history, _host_layers(b, layers)))
    steps = 2 * hp.epochs * len(train_xy[1]) // hp.batch_size  # both backends
    assert len(code_steps) == (steps if pixels == "8-bit" else 0)  # softmax on 8-bit pixels: the codes path
    (hist_np, layers_np), (hist_st, layers_st) = runs
    assert hist_np == hist_st
    for (W1, b1), (W2, b2) in zip(layers_np, layers_st, strict=True):
        np.testing.assert_array_equal(W1, W2)
        np.testing.assert_array_equal(b1, b2)
    assert hist_np[-1]["val/accuracy"] > 0.5  # it learned something


def test_cupy_without_a_gpu_fails_at_start_with_a_fix():
    try:
        import cupy
        if cupy.cuda.is_available():
            pytest.skip("a GPU is visible here")
    except ImportError:
        pass
    with pytest.raises(PipelineError, match="CuPy.*(not installed|no CUDA GPU).*backend=numpy"):
        backend.select("cupy")


def test_auto_is_the_compiled_cpu_path():
    assert backend.select("auto").name == "numba"


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(PipelineError, match="backend.name='tpu'"):
        backend.select("tpu")


def _gpu_or_skip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
    if not cupy.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return backend.select("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [[], [256]])
def test_cupy_matches_numpy_after_one_epoch(subset, hidden):
    gpu = _gpu_or_skip()
    train_xy, val_xy = subset
    runs = []
    for b in (NUMPY, gpu):
        rng = np.random.default_rng(0)
        layers = [(b.to_device(W), b.to_device(bias)) for W, bias in model.init_params(rng, [784, *hidden, 10])]
        fit(b, _hp(epochs=1, lr=0.05, batch_size=128), rng, layers, train_xy, val_xy, 10)
        runs.append(_host_layers(b, layers))
    for (W1, b1), (W2, b2) in zip(*runs, strict=True):
        assert W2.dtype == np.float32
        np.testing.assert_allclose(W2, W1, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b2, b1, rtol=1e-4, atol=1e-6)


@pytest.fixture
def subset():
    X, y = _data(n=6000)
    X = _eight_bit(X)  # with batch 128 the softmax GPU run goes through the uint8 codes too
    return (X[:5000], y[:5000]), (X[5000:], y[5000:])
