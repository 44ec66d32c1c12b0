"""Stage 5, export_filters: the rows of the first weight matrix as 28x28 images
(pipeline.report.filters), written for DVC and logged to the training's MLflow run."""

from pathlib import Path

from pipeline.data import model_file
from pipeline.entry import output_dir, stage
from pipeline.report import filters
from pipeline.tracking import runs


@stage
def main(cfg):
    layers, config = model_file.load(Path(cfg.paths.model) / model_file.FILE)
    # The model's own class names: a model is drawn as it was trained, whatever conf/ says now.
    class_names = config["data"]["class_names"]
    paths = filters.export_filters(*filters.filters_of(layers, class_names), output_dir(), cfg.export)
    with runs.reopened_run(cfg, None, cfg.paths.model):
        runs.log_files(paths, "filters")


if __name__ == "__main__":
    main()
