"""The math of DESIGN.md section 1, checked numerically."""

import numpy as np
import pytest

from pipeline.core import model
from pipeline.core.optim import SGD
from pipeline.data import model_file
from pipeline.errors import PipelineError


@pytest.fixture(params=[1, 5], ids=["per-sample", "batch"])
def batch(request):
    n = request.param
    rng = np.random.default_rng(7)
    X = rng.random((n, 784))  # float64 for the finite-difference checks
    y = np.array([0, 3, 9, 3, 1])[:n]
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


def test_one_hot_is_class_major():
    np.testing.assert_array_equal(model.one_hot([2, 0], 3), [[0, 1], [0, 0], [1, 0]])
    assert model.one_hot([2, 0], 3).dtype == np.float32


def test_init_params_shapes_and_scales():
    layers = model.init_params(np.random.default_rng(0), [784, 256, 10])
    assert [(W.shape, b.shape) for W, b in layers] == [((256, 784), (256,)), ((10, 256), (10,))]
    assert all(W.dtype == np.float32 and b.dtype == np.float32 and not b.any() for W, b in layers)
    assert layers[0][0].std() == pytest.approx((2 / 784) ** 0.5, rel=0.02)  # He
    assert layers[1][0].std() == pytest.approx(0.01, rel=0.05)  # small output weights


def test_gradients_return_the_logits_of_forward(batch):
    W, b, X, onehot, _ = batch
    _, z = model.gradients(np, [(W, b)], X, onehot)
    np.testing.assert_array_equal(z, model.forward(np, [(W, b)], X)[1])
    assert z.shape == (10, len(X))


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


@pytest.mark.parametrize("n", [1, 5])
def test_mlp_gradient_matches_finite_differences(n):
    rng = np.random.default_rng(11)
    X = rng.random((n, 784))
    onehot = model.one_hot(rng.integers(0, 10, size=n), 10).astype(np.float64)
    layers = [(rng.normal(0, 0.1, (16, 784)), rng.normal(0, 0.1, 16)),
              (rng.normal(0, 0.3, (10, 16)), rng.normal(0, 0.1, 10))]
    grads, _ = model.gradients(np, layers, X, onehot)
    eps = 1e-6
    for layer in (0, 1):
        for part in (0, 1):  # W, b
            param = layers[layer][part]
            for index in [tuple(rng.integers(0, s) for s in param.shape) for _ in range(8)]:
                def loss_with(delta):
                    changed = [list(pair) for pair in layers]
                    changed[layer][part] = param.copy()
                    changed[layer][part][index] += delta
                    return float(model.cross_entropy(np, model.forward(np, changed, X)[1], onehot))
                numeric = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
                assert numeric == pytest.approx(grads[layer][part][index], rel=1e-5, abs=1e-9)


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


def test_scores_are_the_mean_loss_and_the_fraction_right():
    z = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=np.float32)  # predicts 0, 1
    labels = np.array([0, 2])
    onehot = model.one_hot(labels, 3)
    loss, accuracy = model.scores(np, z, onehot, labels)
    assert float(accuracy) == 0.5
    assert float(loss) == pytest.approx(float(model.cross_entropy(np, z, onehot)))
    X = np.eye(2, dtype=np.float32)
    layers = [(z, np.zeros(3, np.float32))]  # W = z, so the logits of the identity images are z
    assert [float(v) for v in model.loss_and_accuracy(np, layers, X, onehot, labels)] == \
        pytest.approx([float(loss), 0.5])


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
    expected_W, expected_b = W - 0.5 * np.outer(p - t[:, 0], x[0]), b - 0.5 * (p - t[:, 0])
    _sgd_step(W, b, x, t, lr=0.5)
    np.testing.assert_allclose(W, expected_W, rtol=1e-12)
    np.testing.assert_allclose(b, expected_b, rtol=1e-12)


@pytest.mark.parametrize("sizes", [[10, 2], [10, 4, 3, 2]], ids=["softmax", "mlp"])
def test_saved_model_round_trips_without_pickle(tmp_path, sizes):
    layers = model.init_params(np.random.default_rng(5), sizes)
    layers[-1] = (layers[-1][0], np.arange(sizes[-1], dtype=np.float32) - 1.5)
    config = {"train": {"lr": 0.5}, "model": {"hidden": sizes[1:-1]}}
    model_file.save(tmp_path / "m.npz", layers, config)
    loaded, loaded_config = model_file.load(tmp_path / "m.npz")
    assert loaded_config == config
    assert len(loaded) == len(layers)
    for (W, b), (W2, b2) in zip(layers, loaded, strict=True):
        assert W2.dtype == np.float32 and np.array_equal(W2, W) and np.array_equal(b2, b)
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:  # readable with pickle refused
        assert "config" in npz.files
    first = (tmp_path / "m.npz").read_bytes()
    model_file.save(tmp_path / "m.npz", layers, config)
    assert (tmp_path / "m.npz").read_bytes() == first  # no timestamps inside


def test_a_missing_or_foreign_model_file_says_what_to_do(tmp_path):
    with pytest.raises(PipelineError, match="missing: run the train stage"):
        model_file.load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="not a model written by the train stage"):
        model_file.load(tmp_path / "junk.npz")
