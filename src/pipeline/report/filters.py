"""The rows of the first weight matrix as 28x28 images.

For softmax regression logit i is the correlation of row i of W with the image,
so each row, drawn in a diverging colour map centred on 0, shows the evidence
for (red) and against (blue) class i. For an MLP the rows of the first layer
are the filters its hidden units look for; the grid shows the first 64.
One shared colour scale makes the filters comparable.
"""

import math
import re
from pathlib import Path

import numpy as np

from pipeline.data.files import atomic_path

GRID_FILE = "filters.png"
MLP_GRID_UNITS = 64


def filters_of(layers, class_names):
    """(rows of the first W to draw, their titles, their file stems)."""
    W = layers[0][0]
    if len(layers) == 1:  # softmax regression: one filter per class
        return W, [str(name) for name in class_names], [file_stem(i, name) for i, name in enumerate(class_names)]
    W = W[:MLP_GRID_UNITS]  # MLP: the first hidden units
    return W, [f"unit {i}" for i in range(len(W))], [f"unit_{i}" for i in range(len(W))]


def file_stem(index, name):
    """A file name safe for any class name: the class index (so no two classes share
    a file) and the name with anything but letters, digits, '-' and '_' as '-'
    ('T-shirt/top' -> 'filter_0_T-shirt-top', never a subdirectory)."""
    return f"filter_{index}_{re.sub(r'[^A-Za-z0-9_-]+', '-', str(name)).strip('-')}".rstrip("_")


def export_filters(W, titles, stems, out_dir, export):
    """Write <stem>.png for each row of W and a labelled grid; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    side = int(round(W.shape[1] ** 0.5))
    images = np.asarray(W, dtype=np.float32).reshape(len(W), side, side)
    limit = float(np.abs(images).max()) or 1.0  # symmetric limits put 0 at the map's centre
    paths = []
    for stem, image in zip(stems, images):
        big = np.kron(image, np.ones((export.scale, export.scale), dtype=np.float32))
        path = out_dir / f"{stem}.png"
        with atomic_path(path) as tmp:
            plt.imsave(tmp, big, cmap=export.cmap, vmin=-limit, vmax=limit, format="png",
                       metadata={"Software": None})
        paths.append(path)

    cols = max(export.grid_cols, math.ceil(math.sqrt(len(images))))  # big grids stay square
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, title, image in zip(axes.flat, titles, images):
        shown = ax.imshow(image, cmap=export.cmap, vmin=-limit, vmax=limit)
        ax.set_title(title)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="weight")
    fig.suptitle("Filters: rows of the first weight matrix (red = positive weight)")
    with atomic_path(out_dir / GRID_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return paths + [out_dir / GRID_FILE]
