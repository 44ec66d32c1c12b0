"""The evaluation's files: metrics.json (DVC metrics), confusion.csv (DVC's
confusion plot, one row per test image) and confusion_matrix.png."""

import csv
import io
import json
from pathlib import Path

import numpy as np

from pipeline.data.files import atomic_path, write_text

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "confusion.csv"
CONFUSION_PNG = "confusion_matrix.png"


def write_reports(report, class_names, out_dir):
    """The three files of a report from pipeline.core.metrics.evaluate; returns their paths."""
    out_dir = Path(out_dir)
    metrics = {"test": {
        "loss": round(report["loss"], 6),
        "accuracy": round(report["accuracy"], 6),
        "precision": {name: round(float(v), 6) for name, v in zip(class_names, report["precision"])},
        "recall": {name: round(float(v), 6) for name, v in zip(class_names, report["recall"])},
    }}
    write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((class_names[a], class_names[p]) for a, p in zip(report["actual"], report["predicted"]))
    write_text(out_dir / PREDICTIONS_FILE, rows.getvalue())
    _plot_confusion(report["confusion"], class_names, out_dir / CONFUSION_PNG)
    return [out_dir / name for name in (METRICS_FILE, PREDICTIONS_FILE, CONFUSION_PNG)]


def _plot_confusion(confusion, class_names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        color = "white" if count > confusion.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="actual", title="Confusion matrix (test set)")
    ax.set_xticklabels(class_names, rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right")
    ax.set_yticklabels(class_names)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
