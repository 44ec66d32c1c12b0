"""Stage 4, evaluate: test loss and accuracy, per-class precision and recall,
and the confusion matrix, written as DVC metrics and plots and logged to the
training's MLflow run.
"""

import csv
import io
import json
import logging
from pathlib import Path

import hydra
import mlflow
import numpy as np

from pipeline import backend, model, tracking
from pipeline.config import CONF_DIR, output_dir, validate
from pipeline.errors import exit_on_pipeline_error
from pipeline.files import atomic_path, write_text
from pipeline.normalise import load_split

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "confusion.csv"  # one row per test image: DVC's confusion plot counts them
CONFUSION_PNG = "confusion_matrix.png"


def evaluate(be, layers, test_x, test_y, num_classes):
    """Metrics of the model (host layers) on the test set, as plain Python/NumPy values."""
    xp = be.xp
    X, Y = be.to_device(test_x), be.to_device(model.one_hot(test_y, num_classes))
    _, z = model.forward(xp, [(be.to_device(W), be.to_device(b)) for W, b in layers], X)
    loss = float(model.cross_entropy(xp, z, Y))
    predicted = be.to_host(xp.argmax(z, axis=0)).astype(np.int64)
    actual = np.asarray(test_y, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: actual, cols: predicted
    np.add.at(confusion, (actual, predicted), 1)
    hits = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class never predicted: precision 0
        precision = np.nan_to_num(hits / confusion.sum(axis=0))
        recall = np.nan_to_num(hits / confusion.sum(axis=1))
    return {
        "loss": loss,
        "accuracy": float(hits.sum() / len(actual)),
        "precision": precision,
        "recall": recall,
        "confusion": confusion,
        "actual": actual,
        "predicted": predicted,
    }


def write_reports(report, class_names, out_dir):
    """metrics.json (DVC metrics), confusion.csv (DVC plot) and a confusion PNG."""
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


def log_report(report, class_names, out_dir):
    """Test metrics and the confusion matrix into the active MLflow run."""
    metrics = {"test/loss": report["loss"], "test/accuracy": report["accuracy"]}
    for name, p, r in zip(class_names, report["precision"], report["recall"]):
        metrics[f"test/precision/{name}"], metrics[f"test/recall/{name}"] = float(p), float(r)
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"classes": list(class_names), "rows_actual_cols_predicted": report["confusion"].tolist()},
                    "evaluation/confusion_matrix.json")
    mlflow.log_artifact(str(Path(out_dir) / CONFUSION_PNG), "evaluation")
    mlflow.log_artifact(str(Path(out_dir) / METRICS_FILE), "evaluation")


def evaluate_and_log(cfg, layers, out_dir):
    """Evaluate on the test split, write the reports to out_dir, log them to the active run."""
    test_x, test_y = load_split(cfg.paths.processed, "test")
    class_names = list(cfg.data.class_names)
    report = evaluate(backend.select(cfg.backend.name), layers, test_x, test_y, len(class_names))
    write_reports(report, class_names, out_dir)
    log_report(report, class_names, out_dir)
    log.info("test accuracy %.4f, loss %.4f -> %s", report["accuracy"], report["loss"], out_dir)
    return report


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
    ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="actual", title="Confusion matrix (test set)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    layers, _ = model.load(Path(cfg.paths.model) / model.FILE)
    with tracking.reopened_run(cfg, cfg.paths.model):
        evaluate_and_log(cfg, layers, output_dir())


if __name__ == "__main__":
    main()
