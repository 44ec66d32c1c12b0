"""Stage 4, evaluate: test loss and accuracy (reports/metrics.json), per-class
precision and recall (reports/per_class.json), the confusion matrix (confusion.csv
for DVC's plot, confusion_matrix.png as counts and row-normalised) and a gallery
of misclassified test images (misclassified.png), written as DVC metrics and
outputs and logged to the training's MLflow run."""

import logging
from pathlib import Path

from pipeline.config import effective
from pipeline.core import backend, metrics
from pipeline.data import model_file
from pipeline.data.splits import load_split, read_manifest
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError
from pipeline.report import evaluation
from pipeline.tracking import runs
from pipeline.tracking.store import store_call

log = logging.getLogger(__name__)


@stage
def main(cfg):
    model_path = Path(cfg.paths.model) / model_file.FILE
    manifest = read_manifest(cfg.paths.processed, cfg.data)
    pixels = manifest["arrays"]["test"]["x"]["shape"][1]
    layers, trained_with = model_file.load(model_path, n_features=pixels, n_classes=len(cfg.data.class_names),
                                           hidden=list(cfg.model.hidden))
    if trained_with["data"] != effective(cfg)["data"]:
        raise PipelineError(f"{model_path} was trained on other data (data.name {trained_with['data']['name']!r}) "
                            f"than the config's and {cfg.paths.processed}'s ({cfg.data.name!r}): run `dvc repro`")
    test_x, test_y = load_split(cfg.paths.processed, "test")
    class_names = list(cfg.data.class_names)
    report = metrics.evaluate(backend.select(cfg.backend.name), layers, test_x, test_y, len(class_names))
    paths = evaluation.write_reports(report, class_names, output_dir(), test_x)
    try:
        with runs.reopened_run(cfg, manifest, cfg.paths.model, trained_with, "evaluate"):
            with store_call("log the evaluation"):
                runs.log_evaluation(report, class_names, paths)
    except PipelineError as err:  # the store failed: what was computed is on disk all the same
        raise PipelineError(f"{err}\nThe reports are written: {output_dir()}") from err
    log.info("test accuracy %.4f, loss %.4f -> %s", report["accuracy"], report["loss"], output_dir())


if __name__ == "__main__":
    main()
