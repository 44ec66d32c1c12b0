"""Stage 5, export_filters: the rows of the first weight matrix as 28x28 images.

For softmax regression logit i is the correlation of row i of W with the image,
so each row, drawn in a diverging colour map centred on 0, shows the evidence
for (red) and against (blue) class i. For an MLP the rows of the first layer
are the filters its hidden units look for; the grid shows the first 64.
One shared colour scale makes the filters comparable.
"""

import math
from pathlib import Path

import hydra
import mlflow
import numpy as np

from pipeline import model, tracking
from pipeline.config import CONF_DIR, output_dir, validate
from pipeline.errors import exit_on_pipeline_error
from pipeline.files import atomic_path

GRID_FILE = "filters.png"
MLP_GRID_UNITS = 64


def export_filters(W, names, out_dir, export):
    """Write filter_<name>.png for each row of W and a labelled grid; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    side = int(round(W.shape[1] ** 0.5))
    images = np.asarray(W, dtype=np.float32).reshape(len(W), side, side)
    limit = float(np.abs(images).max()) or 1.0  # symmetric limits put 0 at the map's centre
    paths = []
    for name, image in zip(names, images):
        big = np.kron(image, np.ones((export.scale, export.scale), dtype=np.float32))
        path = out_dir / f"filter_{name.split()[-1]}.png"
        with atomic_path(path) as tmp:
            plt.imsave(tmp, big, cmap=export.cmap, vmin=-limit, vmax=limit, format="png",
                       metadata={"Software": None})
        paths.append(path)

    cols = max(export.grid_cols, math.ceil(math.sqrt(len(images))))  # big grids stay square
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, image in zip(axes.flat, names, images):
        shown = ax.imshow(image, cmap=export.cmap, vmin=-limit, vmax=limit)
        ax.set_title(name)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="weight")
    fig.suptitle("Filters: rows of the first weight matrix (red = positive weight)")
    with atomic_path(out_dir / GRID_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return paths + [out_dir / GRID_FILE]


def export_and_log(cfg, layers, out_dir):
    W = layers[0][0]
    if len(layers) == 1:  # softmax regression: one filter per class
        names = [f"class {name}" for name in cfg.data.class_names]
    else:  # MLP: the first hidden units
        W = W[:MLP_GRID_UNITS]
        names = [f"unit {i}" for i in range(len(W))]
    paths = export_filters(W, names, out_dir, cfg.export)
    for path in paths:
        mlflow.log_artifact(str(path), "filters")
    return paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    layers, _ = model.load(Path(cfg.paths.model) / model.FILE)
    with tracking.reopened_run(cfg, cfg.paths.model):
        export_and_log(cfg, layers, output_dir())


if __name__ == "__main__":
    main()
