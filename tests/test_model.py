"""The math of DESIGN.md section 1, checked numerically."""

import numpy as np
import pytest

from pipeline import model
from pipeline.optim import SGD


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    X = rng.random((5, 784))  # float64 for the finite-difference checks
    y = np.array([0, 3, 9, 3, 1])
    W = rng.normal(0, 0.05, size=(10, 784))
    b = rng.normal(0, 0.05, size=10)
    return W, b, X, model.one_hot(y, 10).astype(np.float64), y


def _loss(W, b, X, onehot):
    return float(model.cross_entropy(np, model.forward(np, [(W, b)], X)[1], onehot))


def _grads(W, b, X, onehot):
    ((grad_W, grad_b),), _ = model.gradients(np, [(W, b)], X, onehot)
    return grad_W, grad_b


def _sgd_step(W, b, X, onehot, lr):
    SGD(np, [(W, b)]).step([(W, b)], [_grads(W, b, X, onehot)], lr)


def test_gradient_matches_finite_differences(batch):
    W, b, X, onehot, _ = batch
    grad_W, grad_b = _grads(W, b, X, onehot)
    rng, eps = np.random.default_rng(0), 1e-6
    for i, j in zip(rng.integers(0, 10, 25), rng.integers(0, 784, 25)):
        Wp, Wm = W.copy(), W.copy()
        Wp[i, j] += eps
        Wm[i, j] -= eps
        numeric = (_loss(Wp, b, X, onehot) - _loss(Wm, b, X, onehot)) / (2 * eps)
        assert numeric == pytest.approx(grad_W[i, j], rel=1e-5, abs=1e-9)
    for i in range(10):
        bp, bm = b.copy(), b.copy()
        bp[i] += eps
        bm[i] -= eps
        numeric = (_loss(W, bp, X, onehot) - _loss(W, bm, X, onehot)) / (2 * eps)
        assert numeric == pytest.approx(grad_b[i], rel=1e-5, abs=1e-9)


def test_gradient_is_the_lectures_closed_form(batch):
    """dL/dW_i = (p_i - [i == y]) x, averaged over the samples, written out per sample."""
    W, b, X, onehot, y = batch
    grad_W, grad_b = _grads(W, b, X, onehot)
    expected_W, expected_b = np.zeros_like(W), np.zeros_like(b)
    for x, label in zip(X, y):
        logit = W @ x + b
        p = np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
        for i in range(10):
            expected_W[i] += (p[i] - (i == label)) * x / len(X)
            expected_b[i] += (p[i] - (i == label)) / len(X)
    np.testing.assert_allclose(grad_W, expected_W, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad_b, expected_b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_softmax_and_cross_entropy_stay_finite_for_huge_logits(scale):
    # Class-major: one column per image, three classes.
    z = np.array([[scale, 0.0, -scale], [-scale, -scale, scale]], dtype=np.float32).T
    onehot = model.one_hot([2, 2], 3)  # the first image is confidently wrong
    p = model.softmax(np, z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.T, [[1, 0, 0], [0, 0, 1]], atol=1e-6)
    loss = model.cross_entropy(np, z, onehot)
    assert np.isfinite(loss)
    assert loss == pytest.approx(scale, rel=1e-5)  # (2 * scale + 0) / 2 rows


def test_one_sgd_step_lowers_the_loss(batch):
    W, b, X, onehot, _ = batch
    W, b, X, onehot = (a.astype(np.float32) for a in (W, b, X, onehot))
    before = _loss(W, b, X, onehot)
    _sgd_step(W, b, X, onehot, lr=0.1)
    after = _loss(W, b, X, onehot)
    assert after < before - 1e-3
    assert W.dtype == np.float32 and b.dtype == np.float32  # float32 end to end


def test_per_sample_sgd_is_the_lecture_update(batch):
    """batch_size = 1: W <- W - lr (p - onehot(y)) x^T for one image."""
    W, b, X, onehot, y = batch
    x, t = X[:1], onehot[:, :1]
    p = model.softmax(np, model.forward(np, [(W, b)], x)[1])[:, 0]
    expected = W - 0.5 * np.outer(p - t[:, 0], x[0])
    _sgd_step(W, b, x, t, lr=0.5)
    np.testing.assert_allclose(W, expected, rtol=1e-12)


def test_saved_model_round_trips_without_pickle(tmp_path):
    W = np.arange(20, dtype=np.float32).reshape(2, 10)
    b = np.array([1.5, -2.0], dtype=np.float32)
    model.save(tmp_path / "m.npz", [(W, b)], '{"train": {"lr": 0.5}}')
    ((W2, b2),), config = model.load(tmp_path / "m.npz")
    assert np.array_equal(W2, W) and np.array_equal(b2, b) and config == {"train": {"lr": 0.5}}
    first = (tmp_path / "m.npz").read_bytes()
    model.save(tmp_path / "m.npz", [(W, b)], '{"train": {"lr": 0.5}}')
    assert (tmp_path / "m.npz").read_bytes() == first  # no timestamps inside
