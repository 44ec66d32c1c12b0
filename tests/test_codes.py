"""The speed path of softmax regression (pipeline.core.codes): the codes must be
exactly normalise's pixels times 255, the gradients computed from them (the
1/255 applied to the logits and the gradient) must equal model.gradients on the
float32 pixels up to float32 rounding, and `fit` must take this path exactly
where codes.applies says so, training to the same parameters."""

import numpy as np
import pytest

from pipeline.core import codes, model, trainer
from pipeline.core.backend import Backend
from pipeline.core.hparams import Hyperparams
from pipeline.data import splits

NUMPY = Backend("numpy", np)


def _eight_bit(rng, n):
    """Images exactly as normalise writes them: k / 255 in float32."""
    return rng.integers(0, 256, size=(n, 784), dtype=np.uint8).astype(np.float32) / np.float32(255)


def _digits(rng, n):
    """Learnable 8-bit images: class k is a bright bar at rows 2k+4..2k+5, plus noise."""
    y = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(y):
        images[i, 2 * k + 4: 2 * k + 6, 4:24] = 255
    return images.reshape(n, 784).astype(np.float32) / np.float32(255), y


def _softmax_layers(rng):
    """Softmax regression with a bias worth seeing."""
    W = rng.normal(0, 0.05, (10, 784)).astype(np.float32)
    return [(W, rng.normal(0, 0.1, 10).astype(np.float32))]


def _close_in_float32(got, want, ulps=32):
    """got == want up to float32 rounding of sums: an error small against the
    array's scale (single entries can cancel to near 0, so not entry by entry)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * np.finfo(np.float32).eps * scale)


def test_pixel_max_is_normalises():
    assert codes.PIXEL_MAX == splits.PIXEL_MAX == 255


def test_codes_round_trip_every_pixel_value_exactly():
    images = np.arange(256, dtype=np.uint8).astype(np.float32)[None, :] / np.float32(255)
    pixel_codes = codes.pixel_codes(images)
    assert pixel_codes.dtype == np.uint8 and pixel_codes.shape == images.shape
    np.testing.assert_array_equal(pixel_codes[0], np.arange(256))
    np.testing.assert_array_equal(pixel_codes.astype(np.float32) / np.float32(255), images)


def test_codes_of_many_chunks_are_every_chunks_codes():
    rng = np.random.default_rng(4)
    want = rng.integers(0, 256, size=(5000, 784), dtype=np.uint8)
    got = codes.pixel_codes(want.astype(np.float32) / np.float32(255), chunk=1024)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("images", [
    np.full((3, 784), 0.5, dtype=np.float32),             # not k / 255
    np.full((3, 784), 2.0, dtype=np.float32),             # above 1
    np.full((3, 784), -1 / 255, dtype=np.float32),        # below 0
    np.full((3, 784), np.nan, dtype=np.float32),          # not a number
    np.zeros((3, 784), dtype=np.float64),                 # not float32
], ids=["between-codes", "above-1", "negative", "nan", "float64"])
def test_images_that_are_not_8_bit_pixels_get_no_codes(images):
    assert codes.pixel_codes(images) is None


def test_one_wrong_pixel_in_a_late_chunk_gets_no_codes():
    images = _eight_bit(np.random.default_rng(0), 5000)
    images[4999, 783] = np.nextafter(images[4999, 783], np.float32(2))
    assert codes.pixel_codes(images, chunk=1024) is None


def test_codes_apply_to_softmax_regression_from_min_batch_on():
    rng = np.random.default_rng(0)
    softmax, mlp = model.init_params(rng, [784, 10]), model.init_params(rng, [784, 16, 10])
    assert codes.MIN_BATCH == 16
    assert codes.applies(softmax, codes.MIN_BATCH) and codes.applies(softmax, 128)
    assert not codes.applies(softmax, codes.MIN_BATCH - 1) and not codes.applies(softmax, 1)
    assert not codes.applies(mlp, 128)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 15, 16, 32, 128])
def test_code_gradients_equal_gradients_of_the_float32_pixels(seed, n):
    rng = np.random.default_rng(seed)
    pixel_codes = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
    onehot = model.one_hot(rng.integers(0, 10, size=n), 10)
    layers = _softmax_layers(rng)
    ((gW, gb),), z = codes.gradients(np, layers, pixel_codes, onehot)
    ((want_gW, want_gb),), want_z = model.gradients(np, layers, pixel_codes.astype(np.float32) / np.float32(255),
                                                    onehot)
    _close_in_float32(z, want_z)
    _close_in_float32(gW, want_gW)
    _close_in_float32(gb, want_gb)
    # Both are float32 roundings of the same float64 gradient.
    layers64 = [(W.astype(np.float64), b.astype(np.float64)) for W, b in layers]
    ((exact_gW, exact_gb),), _ = model.gradients(np, layers64, pixel_codes / 255.0, onehot.astype(np.float64))
    _close_in_float32(gW, exact_gW.astype(np.float32))
    _close_in_float32(gb, exact_gb.astype(np.float32))


def _spies(monkeypatch):
    """Record what each step trained on: (path, dtype, largest pixel). fit looks up
    codes.gradients and model.gradients on their modules when it starts."""
    steps = []
    for name, module in (("codes", codes), ("model", model)):
        def spy(xp, layers, images, onehot, _original=module.gradients, _name=name):
            steps.append((_name, images.dtype, float(images.max())))
            return _original(xp, layers, images, onehot)
        monkeypatch.setattr(module, "gradients", spy)
    return steps


def _fit(hp, hidden, X, y, fast=True):
    init = np.random.default_rng(0)
    layers = model.init_params(init, [784, *hidden, 10])
    history = trainer.fit(NUMPY, hp, init, layers, (X[:-100], y[:-100]), (X[-100:], y[-100:]), 10, fast=fast)
    return history, layers


@pytest.mark.parametrize("hidden, batch_size, fast, eight_bit, path", [
    ([], codes.MIN_BATCH, True, True, "codes"),
    ([], 64, True, True, "codes"),
    ([16], 64, True, True, "model"),                       # the MLP: codes do not apply
    ([], codes.MIN_BATCH - 1, True, True, "model"),        # batches too small to pay
    ([], 1, True, True, "model"),                          # per-sample SGD
    ([], 64, False, True, "model"),                        # backend.fast=false
    ([], 64, True, False, "model"),                        # not 8-bit pixels: no codes
], ids=["softmax-min-batch", "softmax", "mlp", "small-batch", "per-sample", "not-fast", "not-8-bit"])
def test_fit_trains_from_codes_exactly_where_they_apply(monkeypatch, hidden, batch_size, fast, eight_bit, path):
    rng = np.random.default_rng(1)
    n = 100 + (40 if batch_size == 1 else 320)
    X, y = _digits(rng, n)
    if not eight_bit:
        X[0, 0] = 0.5  # one pixel between two codes
    steps = _spies(monkeypatch)
    _fit(Hyperparams(lr=0.05, epochs=1, batch_size=batch_size), hidden, X, y, fast=fast)
    assert len(steps) == -(-(n - 100) // batch_size)  # one call per minibatch
    if path == "codes":
        assert set(steps) <= {("codes", np.dtype(np.uint8), hi) for hi in range(256)}  # the raw 8-bit codes
        assert max(hi for *_, hi in steps) == 255
    else:
        assert {(name, dtype) for name, dtype, _ in steps} == {("model", np.dtype(np.float32))}
        assert max(hi for *_, hi in steps) <= 1.0  # the float32 pixels


@pytest.mark.parametrize("nesterov", [False, True])
def test_training_from_codes_matches_training_from_float32(monkeypatch, nesterov):
    rng = np.random.default_rng(1)
    X, y = _digits(rng, 600)
    hp = Hyperparams(lr=0.1, epochs=2, batch_size=32, momentum=0.9, nesterov=nesterov, weight_decay=1e-3,
                     schedule="cosine")
    steps = _spies(monkeypatch)
    hist_codes, layers_codes = _fit(hp, [], X, y, fast=True)
    paths_codes, steps[:] = {name for name, *_ in steps}, []
    hist_float, layers_float = _fit(hp, [], X, y, fast=False)
    assert paths_codes == {"codes"} and {name for name, *_ in steps} == {"model"}
    assert hist_float[-1]["val/accuracy"] > 0.9  # it learned: the parameters moved far from their start
    for row_codes, row_float in zip(hist_codes, hist_float, strict=True):
        assert row_codes == pytest.approx(row_float, rel=1e-5)
    for (W1, b1), (W2, b2) in zip(layers_codes, layers_float, strict=True):
        np.testing.assert_allclose(W1, W2, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b1, b2, rtol=1e-4, atol=1e-7)
