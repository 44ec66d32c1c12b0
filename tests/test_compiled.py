"""The compiled path (backend numba, pipeline.core.compiled) trains softmax regression
to the same parameters and the same per-epoch rows as the array-API NumPy path: same
seed, same host-RNG order, up to float32 rounding. And the backend is chosen as the
config says: `numba` by name, `auto` without a GPU; the MLP stays on the NumPy code.

Tolerances. Both paths round every sum in float32, in different orders (NumPy's
BLAS blocks, the compiled loops pixel by pixel), so after an epoch the parameters
differ by rounding grown over thousands of steps: an absolute error of the order
of the array's scale times float32's eps times the steps, not a relative error of
each entry (an entry that crossed zero has no meaningful relative error). So
entries must agree within rtol 1e-4, with atol 1e-4 of the array's largest value;
and the compiled result must be as close to a float64 run of the lecture code as
NumPy's float32 run is (so a real difference in the update, not rounding, fails)."""

import sys

import numpy as np
import pytest
import yaml

from pipeline.config import BACKENDS, CONF_DIR
from pipeline.core import backend, compiled, model, trainer
from pipeline.core.hparams import Hyperparams
from pipeline.data import splits
from pipeline.errors import PipelineError

N_TRAIN, N_VAL = 3000, 500


def _mnist_like(seed, n):
    """8-bit images shaped like MNIST's: mostly zero pixels, class k a bright bar at
    rows 2k+4..2k+5 with noise on about a fifth of the pixels; labels (n,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    codes = rng.integers(1, 256, size=(n, 28, 28)).astype(np.uint8) * (rng.random((n, 28, 28)) < 0.15)
    for i, k in enumerate(y):
        codes[i, 2 * k + 4: 2 * k + 6, 4:24] = rng.integers(128, 256, size=(2, 20))
    return codes.reshape(n, 784).astype(np.float32) / np.float32(255), y.astype(np.uint8)


TRAIN, VAL = _mnist_like(0, N_TRAIN), _mnist_like(1, N_VAL)


def _fit(name, hp, hidden=(), fast=True, data=(TRAIN, VAL), float64=False):
    """(history, layers, parameters seen by on_epoch) of a training from seed 0."""
    rng = np.random.default_rng(0)
    layers = model.init_params(rng, [784, *hidden, 10])
    train, val = data
    if float64:  # the exact reference: the same code and order in float64
        layers = [(W.astype(np.float64), b.astype(np.float64)) for W, b in layers]
        train = (train[0].astype(np.float64), train[1])
    seen = []
    history = trainer.fit(backend.select(name), hp, rng, layers, train, val, 10, fast=fast,
                          on_epoch=lambda epoch, row: seen.append((row, [(W.copy(), b.copy()) for W, b in layers])))
    return history, layers, seen


def _close(got, want, exact=None, reference=None):
    """got == want within rtol 1e-4 and atol 1e-4 of want's scale; and, given the float64
    run `exact` and NumPy's float32 `reference`, got no farther from exact than reference."""
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))
    if exact is not None:
        ours, theirs = np.max(np.abs(got - exact)), np.max(np.abs(reference - exact))
        assert ours <= 2 * theirs + 1e-7, (ours, theirs)


def _rows_agree(got, want, n):
    assert [list(row) for row in got] == [list(row) for row in want]  # same keys, same order
    for row_got, row_want in zip(got, want, strict=True):
        assert row_got["epoch"] == row_want["epoch"]
        for key in ("train/loss", "val/loss"):
            assert row_got[key] == pytest.approx(row_want[key], rel=1e-4), key
        assert row_got["train/accuracy"] == pytest.approx(row_want["train/accuracy"], abs=2 / n)
        assert row_got["val/accuracy"] == pytest.approx(row_want["val/accuracy"], abs=2 / N_VAL)


CASES = {  # id: Hyperparams of one epoch (two where the schedule matters)
    "per-sample": Hyperparams(lr=0.01, epochs=1, batch_size=1),
    "batch-16": Hyperparams(lr=0.1, epochs=1, batch_size=16),
    "batch-128": Hyperparams(lr=0.2, epochs=1, batch_size=128),
    "heavy-ball-16": Hyperparams(lr=0.05, epochs=1, batch_size=16, momentum=0.9),
    "nesterov-decay-128": Hyperparams(lr=0.2, epochs=1, batch_size=128, momentum=0.9, nesterov=True,
                                      weight_decay=1e-3),
    "per-sample-nesterov-decay": Hyperparams(lr=0.003, epochs=1, batch_size=1, momentum=0.5, nesterov=True,
                                             weight_decay=1e-4),
    "step-schedule-decay-32": Hyperparams(lr=0.3, epochs=2, batch_size=32, weight_decay=1e-4, schedule="step",
                                          step_epochs=1, gamma=0.1),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_training_equals_the_array_api_numpy_path(case):
    hp = CASES[case]
    hist_numba, layers_numba, seen_numba = _fit("numba", hp)
    _, layers_exact, _ = _fit("numpy", hp, fast=False, float64=True)
    for fast in (False, True):
        hist_numpy, layers_numpy, seen_numpy = _fit("numpy", hp, fast=fast)
        _rows_agree(hist_numba, hist_numpy, N_TRAIN)
        _rows_agree([row for row, _ in seen_numba], [row for row, _ in seen_numpy], N_TRAIN)
        assert [row["train/lr"] for row, _ in seen_numba] == [row["train/lr"] for row, _ in seen_numpy]
        # The layers on_epoch sees are the epoch's, on both paths (the filter images read them).
        for (_, got), (_, want) in zip(seen_numba, seen_numpy, strict=True):
            _close(got[0][0], want[0][0])
        ((W, b),), ((W_np, b_np),), ((W_64, b_64),) = layers_numba, layers_numpy, layers_exact
        _close(W, W_np, W_64, W_np)
        _close(b, b_np, b_64, b_np)
    assert hist_numba[-1]["val/accuracy"] > 0.8  # it learned: the parameters moved far from their start
    assert np.max(np.abs(W - model.init_params(np.random.default_rng(0), [784, 10])[0][0])) > 1e-2


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_diverging_training_raises_on_the_compiled_path_as_on_numpy():
    messages = []
    for name in ("numba", "numpy"):
        for batch in (1, 16):
            hp = Hyperparams(lr=1e38, epochs=3, batch_size=batch)  # the weights overflow to inf
            with pytest.raises(trainer.DivergenceError, match="training diverged.*in epoch 1 .*lower train.lr") as err:
                _fit(name, hp)
            messages.append(str(err.value))
    assert "nan (train)" in messages[0] and messages[:2] == messages[2:]


def test_backend_fast_false_on_numba_is_the_plain_numpy_code():
    """backend.fast=false means the lecture's code everywhere: bit for bit NumPy's plain path."""
    hp = Hyperparams(lr=0.1, epochs=1, batch_size=16, momentum=0.9)
    history_numba, layers_numba, _ = _fit("numba", hp, fast=False)
    history_numpy, layers_numpy, _ = _fit("numpy", hp, fast=False)
    for (W, b), (W_ref, b_ref) in zip(layers_numba, layers_numpy, strict=True):
        assert np.array_equal(W, W_ref) and np.array_equal(b, b_ref)
    assert [row["val/loss"] for row in history_numba] == [row["val/loss"] for row in history_numpy]


def test_the_mlp_on_backend_numba_is_the_numpy_code():
    hp = Hyperparams(lr=0.05, epochs=1, batch_size=64, momentum=0.9)
    hist_numba, layers_numba, _ = _fit("numba", hp, hidden=[32])
    hist_numpy, layers_numpy, _ = _fit("numpy", hp, hidden=[32])
    assert hist_numba == hist_numpy
    for (W1, b1), (W2, b2) in zip(layers_numba, layers_numpy, strict=True):
        np.testing.assert_array_equal(W1, W2)
        np.testing.assert_array_equal(b1, b2)


def test_images_that_are_not_8_bit_pixels_train_on_the_numpy_code():
    (X, y), val = TRAIN, VAL
    X = X.copy()
    X[0, 0] = 0.5  # between two codes: no pixel codes, so no compiled path
    hp = Hyperparams(lr=0.1, epochs=1, batch_size=16)
    hist_numba, ((W1, b1),), _ = _fit("numba", hp, data=((X, y), val))
    hist_numpy, ((W2, b2),), _ = _fit("numpy", hp, data=((X, y), val))
    assert hist_numba == hist_numpy
    np.testing.assert_array_equal(W1, W2)
    np.testing.assert_array_equal(b1, b2)


def test_lit_pixels_are_the_nonzero_codes_row_by_row():
    codes = (TRAIN[0][:50] * 255).round().astype(np.uint8)
    images = compiled.Images(codes)
    assert images.indptr[0] == 0 and images.indptr[-1] == np.count_nonzero(codes)
    for i in (0, 17, 49):
        lo, hi = images.indptr[i], images.indptr[i + 1]
        np.testing.assert_array_equal(images.column[lo:hi], np.flatnonzero(codes[i]))
        np.testing.assert_array_equal(images.code[lo:hi], codes[i][codes[i] != 0])


def test_the_pixel_table_is_normalises_float32_values():
    assert compiled.PIXEL_MAX == splits.PIXEL_MAX
    k = np.arange(256)
    np.testing.assert_array_equal(compiled.PIXEL, k.astype(np.float32) / np.float32(splits.PIXEL_MAX))
    assert compiled.PIXEL.dtype == np.float32


def test_backend_numba_is_numpy_by_its_own_name():
    be = backend.select("numba")
    assert be.name == "numba" and be.xp is np
    host = np.arange(3, dtype=np.float32)
    assert be.to_host(be.to_device(host)) is host
    assert "numba" in BACKENDS
    assert yaml.safe_load((CONF_DIR / "backend" / "numba.yaml").read_text())["name"] == "numba"


def _gpu_visible():
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.cuda.is_available())


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible here: auto picks CuPy")
def test_auto_without_a_gpu_is_numba():
    assert backend.select("auto").name == "numba"


def test_without_numba_backend_numba_fails_with_a_fix_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    with pytest.raises(PipelineError, match="backend=numba: Numba does not import.*pip install -e"):
        backend.select("numba")
    if not _gpu_visible():
        assert backend.select("auto").name == "numpy"
