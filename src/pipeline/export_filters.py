"""Stage 5, export_filters: the rows of the first weight matrix as 28x28 images
(pipeline.report.filters), written for DVC and logged to the training's MLflow run."""

from pathlib import Path

from pipeline.data import model_file
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError
from pipeline.report import filters
from pipeline.tracking import runs
from pipeline.tracking.store import store_call


@stage
def main(cfg):
    filters.check(cfg.export)
    layers, config = model_file.load(Path(cfg.paths.model) / model_file.FILE)
    # The model's own class names: a model is drawn as it was trained, whatever conf/ says now.
    class_names = config["data"]["class_names"]
    paths = filters.export_filters(*filters.filters_of(layers, class_names), output_dir(), cfg.export)
    try:
        with runs.reopened_run(cfg, None, cfg.paths.model, config, "export_filters"):
            with store_call("log the filters"):
                runs.log_files(paths, "filters")
    except PipelineError as err:  # the store failed: the pictures are on disk all the same
        raise PipelineError(f"{err}\nThe filters are written: {output_dir()}") from err


if __name__ == "__main__":
    main()
