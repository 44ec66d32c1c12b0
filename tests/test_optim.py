"""Optimizers and schedules against hand-computed steps."""

import math

import numpy as np
import pytest

from pipeline.core.hparams import Hyperparams
from pipeline.core.optim import SGD, learning_rate


def _layer():
    return [(np.array([[1.0, -2.0]], dtype=np.float32), np.array([0.5], dtype=np.float32))]


G = [(np.array([[0.1, 0.2]], dtype=np.float32), np.array([-0.3], dtype=np.float32))]


def test_plain_sgd_is_w_minus_lr_g():
    layers = _layer()
    SGD(np, layers).step(layers, G, lr=0.5)
    np.testing.assert_allclose(layers[0][0], [[0.95, -2.1]], rtol=1e-6)
    np.testing.assert_allclose(layers[0][1], [0.65], rtol=1e-6)


def test_momentum_two_steps_by_hand():
    layers = _layer()
    opt = SGD(np, layers, momentum=0.9)
    opt.step(layers, G, lr=0.1)  # v = g;            w = 1 - 0.1 * 0.1
    opt.step(layers, G, lr=0.1)  # v = 0.9 g + g;    w -= 0.1 * 1.9 * 0.1
    np.testing.assert_allclose(layers[0][0][0, 0], 1.0 - 0.01 - 0.019, rtol=1e-6)
    np.testing.assert_allclose(layers[0][1][0], 0.5 + 0.03 + 0.057, rtol=1e-6)


def test_nesterov_two_steps_by_hand():
    layers = _layer()
    opt = SGD(np, layers, momentum=0.9, nesterov=True)
    opt.step(layers, G, lr=0.1)  # v = g;         update = g + 0.9 v = 1.9 g
    opt.step(layers, G, lr=0.1)  # v = 1.9 g;     update = g + 0.9 * 1.9 g = 2.71 g
    np.testing.assert_allclose(layers[0][0][0, 1], -2.0 - 0.1 * 0.2 * (1.9 + 2.71), rtol=1e-6)


def test_weight_decay_pulls_weights_not_biases():
    layers = _layer()
    zero = [(np.zeros((1, 2), np.float32), np.zeros(1, np.float32))]
    SGD(np, layers, weight_decay=0.1).step(layers, zero, lr=0.5)
    np.testing.assert_allclose(layers[0][0], [[0.95, -1.9]], rtol=1e-6)  # w - 0.5 * 0.1 * w
    np.testing.assert_allclose(layers[0][1], [0.5])


def test_updates_stay_float32():
    layers = _layer()
    SGD(np, layers, momentum=0.5, weight_decay=0.01).step(layers, G, lr=0.1)
    assert layers[0][0].dtype == np.float32 and layers[0][1].dtype == np.float32


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("step", [1.0, 1.0, 0.5, 0.5, 0.25]),
    ("cosine", [1.0] + [0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(1, 5)]),
])
def test_schedules(schedule, expected):
    hp = Hyperparams(lr=1.0, epochs=5, schedule=schedule, step_epochs=2, gamma=0.5)
    assert [learning_rate(hp, e) for e in range(1, 6)] == pytest.approx(expected)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        learning_rate(Hyperparams(schedule="linear"), 1)


def test_momentum_with_weight_decay_two_steps_by_hand():
    layers = _layer()
    opt = SGD(np, layers, momentum=0.9, weight_decay=0.1)
    opt.step(layers, G, lr=0.1)  # g' = 0.1 + 0.1 * 1 = 0.2;       v = 0.2;          w = 1 - 0.02 = 0.98
    opt.step(layers, G, lr=0.1)  # g' = 0.1 + 0.1 * 0.98 = 0.198;  v = 0.18 + 0.198; w -= 0.1 * v
    np.testing.assert_allclose(layers[0][0][0, 0], 0.98 - 0.1 * (0.9 * 0.2 + 0.198), rtol=1e-6)
    np.testing.assert_allclose(layers[0][1][0], 0.5 + 0.03 + 0.057, rtol=1e-6)  # the bias: no decay


def test_an_mlp_steps_every_layer():
    layers = [(np.ones((3, 2), np.float32), np.ones(3, np.float32)),
              (np.ones((1, 3), np.float32), np.ones(1, np.float32))]
    grads = [(np.full((3, 2), 0.5, np.float32), np.full(3, 0.5, np.float32)),
             (np.full((1, 3), 2.0, np.float32), np.full(1, 2.0, np.float32))]
    opt = SGD(np, layers, momentum=0.5)
    for _ in range(2):
        opt.step(layers, grads, lr=0.1)  # v = g, then 1.5 g: w = 1 - 0.1 * 2.5 g
    for (W, b), (gW, gb) in zip(layers, grads, strict=True):
        np.testing.assert_allclose(W, 1 - 0.25 * gW, rtol=1e-6)
        np.testing.assert_allclose(b, 1 - 0.25 * gb, rtol=1e-6)
