"""The fused GPU path (backend cupy, pipeline.core.fused_gpu) trains softmax regression
to the same parameters and per-epoch rows as the array-API NumPy path, like the
compiled CPU path: the cases, data and tolerances of tests/test_compiled.py (same
seed, same host-RNG order, float32 rounding in another order). The GPU tests skip
with a reason where CuPy or a CUDA GPU is missing; the fallbacks (the MLP, images
that are not 8-bit pixels) and the kernel constants need neither and run anywhere."""

import numpy as np
import pytest

from pipeline.core import fused_gpu, model
from pipeline.core.optim import learning_rate
from pipeline.data import splits
from test_compiled import CASES, N_TRAIN, TRAIN, VAL, _close, _fit, _rows_agree


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy is installed but no CUDA GPU is visible (cupy.cuda.is_available() is False)")
    return cupy


def _fit_fused(hp, data=(TRAIN, VAL)):
    """trainer.fit's loop around fused_gpu.epochs: (history, host layers, parameters after each
    epoch), from seed 0 as test_compiled._fit, so both train on the same order."""
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(0)
    layers = [(cupy.asarray(W), cupy.asarray(b)) for W, b in model.init_params(rng, [784, 10])]
    epoch = fused_gpu.epochs(hp, layers, *data, 10)
    assert epoch is not None
    history, seen = [], []
    for number in range(1, hp.epochs + 1):
        figures = epoch(rng.permutation(len(data[0][1])), learning_rate(hp, number))
        history.append(dict(zip(("epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy"),
                                (number, *(float(value) for value in figures)))))
        seen.append([(W.get(), b.get()) for W, b in layers])
    return history, seen[-1], seen


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fused_gpu_training_equals_the_array_api_numpy_path(case):
    hp = CASES[case]
    hist_gpu, layers_gpu, seen_gpu = _fit_fused(hp)
    _, layers_exact, _ = _fit("numpy", hp, fast=False, float64=True)
    for fast in (False, True):
        hist_numpy, layers_numpy, seen_numpy = _fit("numpy", hp, fast=fast)
        _rows_agree(hist_gpu, hist_numpy, N_TRAIN)
        for got, (_, want) in zip(seen_gpu, seen_numpy, strict=True):  # every epoch's parameters
            _close(got[0][0], want[0][0])
        ((W, b),), ((W_np, b_np),), ((W_64, b_64),) = layers_gpu, layers_numpy, layers_exact
        _close(W, W_np, W_64, W_np)
        _close(b, b_np, b_64, b_np)
    assert hist_gpu[-1]["val/accuracy"] > 0.8  # it learned
    assert np.max(np.abs(W - model.init_params(np.random.default_rng(0), [784, 10])[0][0])) > 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["per-sample-nesterov-decay", "heavy-ball-16"])
def test_fused_gpu_training_is_deterministic(case):
    """Every sum in a fixed order: two runs give the same bits."""
    first, second = _fit_fused(CASES[case]), _fit_fused(CASES[case])
    assert first[0] == second[0]
    for (W1, b1), (W2, b2) in zip(first[1], second[1], strict=True):
        np.testing.assert_array_equal(W1, W2)
        np.testing.assert_array_equal(b1, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16, 300])  # 300: a batch in three chunks of the minibatch kernel
def test_a_diverging_fused_training_gives_a_nan_loss(batch):
    from pipeline.core.hparams import Hyperparams

    history, _, _ = _fit_fused(Hyperparams(lr=1e38, epochs=1, batch_size=batch))  # weights overflow to inf
    assert np.isnan(history[0]["train/loss"])  # no fast math: trainer.fit then raises DivergenceError


@pytest.mark.gpu
def test_a_batch_over_several_chunks_equals_numpy():
    from pipeline.core.hparams import Hyperparams

    hp = Hyperparams(lr=0.5, epochs=1, batch_size=fused_gpu.CHUNK * 2 + 44, momentum=0.9, nesterov=True,
                     weight_decay=1e-3)
    hist_gpu, ((W, b),), _ = _fit_fused(hp)
    hist_numpy, ((W_np, b_np),), _ = _fit("numpy", hp)
    _rows_agree(hist_gpu, hist_numpy, N_TRAIN)
    _close(W, W_np)
    _close(b, b_np)


@pytest.mark.gpu
def test_fit_on_backend_cupy_trains_softmax_regression_on_the_fused_path(monkeypatch):
    _cupy_or_skip()
    from pipeline.core import backend, trainer

    taken, real = [], fused_gpu.epochs
    monkeypatch.setattr(fused_gpu, "epochs", lambda *args: taken.append(real(*args)) or taken[-1])
    be = backend.select("cupy")
    rng = np.random.default_rng(0)
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, [784, 10])]
    history = trainer.fit(be, CASES["batch-16"], rng, layers, TRAIN, VAL, 10, progress=False)
    assert len(taken) == 1 and taken[0] is not None  # the fused epoch, not the array-API one
    assert history[-1]["val/accuracy"] > 0.8


# Without a GPU: where the path does not apply, epochs() says so before it imports CuPy.

def test_the_mlp_is_not_for_the_fused_path():
    layers = model.init_params(np.random.default_rng(0), [784, 32, 10])
    assert not fused_gpu.applies(layers, 10)
    assert fused_gpu.epochs(CASES["batch-16"], layers, TRAIN, VAL, 10) is None


def test_images_that_are_not_8_bit_pixels_are_not_for_the_fused_path():
    (X, y), val = TRAIN, VAL
    X = X.copy()
    X[0, 0] = 0.5  # between two codes
    layers = model.init_params(np.random.default_rng(0), [784, 10])
    assert fused_gpu.applies(layers, 10)
    assert fused_gpu.epochs(CASES["batch-16"], layers, (X, y), val, 10) is None


def test_more_classes_than_the_registers_hold_are_not_for_the_fused_path():
    layers = model.init_params(np.random.default_rng(0), [784, fused_gpu.MAX_CLASSES + 1])
    assert not fused_gpu.applies(layers, fused_gpu.MAX_CLASSES + 1)


def test_the_kernels_are_compiled_as_the_cpu_paths_compute():
    """x = code / 255 as normalise stores it; no fast math (a diverging run must show NaN);
    the shared memory fits one block of an H100/H200 (227 KiB)."""
    assert splits.PIXEL_MAX == 255 and "__fdiv_rn((float)code, 255.0f)" in fused_gpu.SOURCE
    options = fused_gpu.kernel_options(10, 784)
    assert not any("fast" in option for option in options)
    assert {"-DCLASSES=10", "-DFEATURES=784"} <= set(options)
    for size in (fused_gpu.per_sample_shared_bytes(10, 784), fused_gpu.minibatch_shared_bytes(10, 784)):
        assert size <= 227 * 1024
    assert all(f"\n{name}(" in fused_gpu.SOURCE for name in fused_gpu.KERNELS)  # each an extern "C" kernel
