"""The trainer gathers minibatches from uint8 pixel codes when the images are
8-bit pixels: the codes must be exactly normalise's pixels times 255, and
training from them (the 1/255 applied to the logits and the gradient, the bias
folded into the first layer's W) must match training from the float32 pixels
up to float32 rounding."""

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import model, trainer
from pipeline.backend import Backend

NUMPY = Backend("numpy", np)


def _eight_bit(rng, n):
    """Images exactly as normalise writes them: k / 255 in float32."""
    return rng.integers(0, 256, size=(n, 784), dtype=np.uint8).astype(np.float32) / np.float32(255)


def test_codes_round_trip_every_pixel_value_exactly():
    images = np.arange(256, dtype=np.uint8).astype(np.float32)[None, :] / np.float32(255)
    codes = trainer.pixel_codes(images)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(codes[0], np.arange(256))
    np.testing.assert_array_equal(codes.astype(np.float32) / np.float32(255), images)


@pytest.mark.parametrize("images", [
    np.full((3, 784), 0.5, dtype=np.float32),             # not k / 255
    np.full((3, 784), 2.0, dtype=np.float32),             # above 1
    np.full((3, 784), -1 / 255, dtype=np.float32),        # below 0
    np.zeros((3, 784), dtype=np.float64),                 # not float32
], ids=["between-codes", "above-1", "negative", "float64"])
def test_images_that_are_not_8_bit_pixels_get_no_codes(images):
    assert trainer.pixel_codes(images) is None


def test_one_wrong_pixel_in_a_late_chunk_gets_no_codes():
    images = _eight_bit(np.random.default_rng(0), 5000)
    images[4999, 783] = np.nextafter(images[4999, 783], np.float32(2))
    assert trainer.pixel_codes(images, chunk=1024) is None


def test_training_from_codes_matches_training_from_float32(monkeypatch):
    rng = np.random.default_rng(1)
    X, y = _eight_bit(rng, 600), rng.integers(0, 10, size=600)
    hp = SimpleNamespace(lr=0.1, epochs=2, batch_size=trainer.CODES_MIN_BATCH, momentum=0.9, nesterov=False, weight_decay=0.0,
                         schedule="constant", step_epochs=1, gamma=1.0)
    runs, scales = [], []
    gradients = model.gradients

    def spy(xp, layers, images, onehot, input_scale=None):  # what each step really trained on
        scales.append((input_scale, images.shape[1], images.max()))
        return gradients(xp, layers, images, onehot, input_scale)

    monkeypatch.setattr(model, "gradients", spy)
    for codes in (True, False):
        if not codes:
            monkeypatch.setattr(trainer, "pixel_codes", lambda images: None)
        init = np.random.default_rng(0)
        layers = model.init_params(init, [784, 16, 10])
        history = trainer.fit(NUMPY, hp, init, layers, (X[:500], y[:500]), (X[500:], y[500:]), 10)
        runs.append((history, layers))
    steps = len(scales) // 2
    assert set(scales[:steps]) == {(1 / 255, 785, 255.0)}  # codes with the bias column, scaled in the model
    assert {scale for scale, _, _ in scales[steps:]} == {None} and max(hi for *_, hi in scales[steps:]) == 1.0
    (hist_codes, layers_codes), (hist_float, layers_float) = runs
    for row_codes, row_float in zip(hist_codes, hist_float, strict=True):
        assert row_codes == pytest.approx(row_float, rel=1e-5)
    for (W1, b1), (W2, b2) in zip(layers_codes, layers_float):
        np.testing.assert_allclose(W1, W2, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b1, b2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("hidden", [[], [16]], ids=["softmax", "mlp"])
@pytest.mark.parametrize("n", [1, 32])  # batch 1 takes the outer-product path
def test_gradients_with_an_input_scale_equal_gradients_of_the_scaled_images(hidden, n):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(n, 784)).astype(np.float32)
    onehot = model.one_hot(rng.integers(0, 10, size=n), 10)
    layers = model.init_params(rng, [784, *hidden, 10])
    grads, z = model.gradients(np, layers, codes, onehot, input_scale=1 / 255)
    want_grads, want_z = model.gradients(np, layers, codes / np.float32(255), onehot)
    np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-6)
    for got, want in zip(sum(grads, ()), sum(want_grads, ()), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("hidden", [[], [16]], ids=["softmax", "mlp"])
def test_gradients_with_the_bias_folded_into_w_equal_the_separate_ones(hidden):
    """The trainer's bias trick: codes with a last column of 255, the first layer as
    [W | b] with bias None, and the input scale 1/255 that makes that column 1."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(32, 784)).astype(np.float32)
    onehot = model.one_hot(rng.integers(0, 10, size=32), 10)
    layers = model.init_params(rng, [784, *hidden, 10])
    layers[0] = (layers[0][0], rng.normal(0, 0.1, layers[0][1].shape).astype(np.float32))  # a bias to see
    folded = [(np.concatenate([layers[0][0], layers[0][1][:, None]], axis=1), None), *layers[1:]]
    with_ones = np.concatenate([codes, np.full((32, 1), 255, np.float32)], axis=1)
    grads, z = model.gradients(np, folded, with_ones, onehot, input_scale=1 / 255)
    want_grads, want_z = model.gradients(np, layers, codes / np.float32(255), onehot)
    np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-6)
    (gW, gb), *rest = grads
    assert gb is None
    np.testing.assert_allclose(gW[:, :-1], want_grads[0][0], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(gW[:, -1], want_grads[0][1], rtol=1e-4, atol=1e-8)
    for got, want in zip(sum(rest, ()), sum(want_grads[1:], ()), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
