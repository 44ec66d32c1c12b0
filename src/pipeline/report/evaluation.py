"""The evaluation's files:

- metrics.json: test loss and accuracy (DVC metrics: `dvc metrics show` stays narrow);
- per_class.json: per-class precision and recall (DVC metrics of their own);
- confusion.csv: one row per test image (DVC's confusion plot);
- confusion_matrix.png: the confusion matrix as counts (log colour scale, every
  cell annotated, so single errors show) and normalised per row (the share of
  each actual class predicted as each class; the diagonal is the recall);
- misclassified.png: the first test images the model gets wrong, with their
  true and predicted labels.
"""

import csv
import io
import json
from pathlib import Path

import numpy as np

from pipeline.data.files import atomic_path, write_text

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"
PREDICTIONS_FILE = "confusion.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
MISCLASSIFIED_SHOWN = 25  # a 5x5 gallery
DPI = 150


def write_reports(report, class_names, out_dir, images=None):
    """The files of a report from pipeline.core.metrics.evaluate; returns their paths.
    images: the test images (n, 784) the report was made from; with them the
    gallery of misclassified images is drawn too."""
    out_dir = Path(out_dir)
    metrics = {"test": {"loss": round(report["loss"], 6), "accuracy": round(report["accuracy"], 6)}}
    write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    per_class = {"test": {
        "precision": {name: round(float(v), 6) for name, v in zip(class_names, report["precision"])},
        "recall": {name: round(float(v), 6) for name, v in zip(class_names, report["recall"])},
    }}
    write_text(out_dir / PER_CLASS_FILE, json.dumps(per_class, indent=2) + "\n")
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((class_names[a], class_names[p]) for a, p in zip(report["actual"], report["predicted"]))
    write_text(out_dir / PREDICTIONS_FILE, rows.getvalue())
    plot_confusion(report["confusion"], class_names, out_dir / CONFUSION_PNG)
    names = [METRICS_FILE, PER_CLASS_FILE, PREDICTIONS_FILE, CONFUSION_PNG]
    if images is not None:
        plot_misclassified(images, report["actual"], report["predicted"], class_names, out_dir / MISCLASSIFIED_PNG)
        names.append(MISCLASSIFIED_PNG)
    return [out_dir / name for name in names]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08, metadata={"Software": None})
    _pyplot().close(fig)


def _label_axes(ax, class_names):
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="actual")
    long_names = max(map(len, class_names)) > 2
    ax.set_xticklabels(class_names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticklabels(class_names)


def plot_confusion(confusion, class_names, path):
    """Two panels: counts on a log colour scale (a single error is visible next to
    a thousand hits) and each row as shares of its actual class, both annotated."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    confusion = np.asarray(confusion)
    n = len(class_names)
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nan_to_num(confusion / totals)
    side = max(5.0, 0.55 * n + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * side + 2, side + 0.6), layout="constrained")
    # Zero cells stay white (masked); counts from 1 to the largest on a log scale.
    counts = np.ma.masked_equal(confusion, 0)
    shown = left.imshow(counts, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(int(confusion.max()), 2)))
    fig.colorbar(shown, ax=left, shrink=0.8, label="test images (log scale)")
    mid = np.sqrt(max(int(confusion.max()), 1))  # the middle of the log scale
    for (i, j), count in np.ndenumerate(confusion):
        if count:
            left.text(j, i, str(count), ha="center", va="center", fontsize=7 if n <= 10 else 5,
                      color="white" if count > mid else "black", fontweight="bold" if i != j else "normal")
    _label_axes(left, class_names)
    left.set_title("Counts (off-diagonal: errors)")

    off = shares.copy()
    np.fill_diagonal(off, np.nan)  # the diagonal would dwarf the errors: annotated, not coloured
    top = float(np.nanmax(off)) if n > 1 and np.isfinite(np.nanmax(off)) and np.nanmax(off) > 0 else 1.0
    shown = right.imshow(np.ma.masked_invalid(100 * off), cmap="Reds", vmin=0, vmax=100 * top)
    fig.colorbar(shown, ax=right, shrink=0.8, label="% of the actual class (off the diagonal)")
    for (i, j), share in np.ndenumerate(shares):
        if i == j:
            right.text(j, i, f"{100 * share:.0f}", ha="center", va="center", fontsize=7, color="darkgreen",
                       fontweight="bold")
        elif confusion[i, j]:
            right.text(j, i, f"{100 * share:.1f}", ha="center", va="center", fontsize=6 if n <= 10 else 4,
                       color="white" if share > top / 2 else "black")
    _label_axes(right, class_names)
    right.set_title("Row-normalised, % of actual class\n(diagonal: recall, green)")
    fig.suptitle(f"Confusion matrix, test set ({int(confusion.sum())} images, "
                 f"{int(confusion.sum() - np.trace(confusion))} errors)")
    _save(fig, path)


def misclassified(actual, predicted, count=MISCLASSIFIED_SHOWN):
    """Indices of the first `count` test images whose prediction is wrong, in test-set order."""
    return np.flatnonzero(np.asarray(actual) != np.asarray(predicted))[:count]


def plot_misclassified(images, actual, predicted, class_names, path, count=MISCLASSIFIED_SHOWN):
    """A gallery of the first `count` misclassified test images (5 per row),
    each titled with its index in the test set, true and predicted label."""
    plt = _pyplot()
    wrong = misclassified(actual, predicted, count)
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.15 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    images = np.asarray(images)
    side = int(round(images.shape[1] ** 0.5))
    for ax, k in zip(axes.flat, wrong):
        ax.imshow(images[k].reshape(side, side), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"#{k}: true {class_names[actual[k]]}\npredicted {class_names[predicted[k]]}",
                     fontsize=9, color="firebrick")
    total = int(np.sum(np.asarray(actual) != np.asarray(predicted)))
    fig.suptitle(f"The first {len(wrong)} of {total} misclassified test images" if total
                 else "No misclassified test images")
    _save(fig, path)
