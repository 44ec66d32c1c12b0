"""Test-set metrics of a trained model: loss, accuracy, per-class precision and
recall, and the confusion matrix (rows: actual class, columns: predicted)."""

import numpy as np

from pipeline.core import model


def evaluate(be, layers, images, labels, num_classes):
    """Metrics of the model (host layers) on images (n, 784) and labels, as NumPy values."""
    xp = be.xp
    _, z = model.forward(xp, [(be.to_device(W), be.to_device(b)) for W, b in layers], be.to_device(images))
    loss = float(model.cross_entropy(xp, z, be.to_device(model.one_hot(labels, num_classes))))
    predicted = be.to_host(xp.argmax(z, axis=0)).astype(np.int64)
    actual = np.asarray(labels, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (actual, predicted), 1)
    hits = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class never predicted: precision 0
        precision = np.nan_to_num(hits / confusion.sum(axis=0))
        recall = np.nan_to_num(hits / confusion.sum(axis=1))
    return {"loss": loss, "accuracy": float(hits.sum() / len(actual)), "precision": precision,
            "recall": recall, "confusion": confusion, "actual": actual, "predicted": predicted}
