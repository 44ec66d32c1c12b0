"""Stage 5, export_filters: the rows of W as 28x28 images.

Logit i is the correlation of row i of W with the image, so each row, drawn in
a diverging colour map centred on 0, shows the evidence for (red) and against
(blue) class i. One shared colour scale makes the filters comparable.
"""

from pathlib import Path

import hydra
import mlflow
import numpy as np

from pipeline import model, tracking
from pipeline.config import output_dir, validate
from pipeline.errors import exit_on_pipeline_error
from pipeline.files import atomic_path

GRID_FILE = "filters.png"


def export_filters(W, class_names, out_dir, export):
    """Write filter_<class>.png for each row of W and a labelled grid; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    side = int(round(W.shape[1] ** 0.5))
    images = np.asarray(W, dtype=np.float32).reshape(len(W), side, side)
    limit = float(np.abs(images).max()) or 1.0  # symmetric limits put 0 at the map's centre
    paths = []
    for name, image in zip(class_names, images):
        big = np.kron(image, np.ones((export.scale, export.scale), dtype=np.float32))
        path = out_dir / f"filter_{name}.png"
        with atomic_path(path) as tmp:
            plt.imsave(tmp, big, cmap=export.cmap, vmin=-limit, vmax=limit, format="png",
                       metadata={"Software": None})
        paths.append(path)

    cols = export.grid_cols
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, image in zip(axes.flat, class_names, images):
        shown = ax.imshow(image, cmap=export.cmap, vmin=-limit, vmax=limit)
        ax.set_title(f"class {name}")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="weight")
    fig.suptitle("Filters: rows of W (red = evidence for the class)")
    with atomic_path(out_dir / GRID_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return paths + [out_dir / GRID_FILE]


def export_and_log(cfg, W, out_dir):
    paths = export_filters(W, list(cfg.data.class_names), out_dir, cfg.export)
    for path in paths:
        mlflow.log_artifact(str(path), "filters")
    return paths


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    W, _, _ = model.load(Path(cfg.paths.model) / model.FILE)
    with tracking.reopened_run(cfg, cfg.paths.model):
        export_and_log(cfg, W, output_dir())


if __name__ == "__main__":
    main()
