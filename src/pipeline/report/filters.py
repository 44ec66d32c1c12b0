"""The rows of the first weight matrix as 28x28 images.

For softmax regression logit i is the correlation of row i of W with the image,
so each row, drawn in a diverging colour map centred on 0, shows the evidence
for (red) and against (blue) class i. For an MLP the rows of the first layer
are the filters its hidden units look for; the grid shows the first 64.
Each filter has its own symmetric colour scale, clipped at a high percentile
of its |weights| (export.clip_percentile) so a few extreme pixels do not wash
out the rest; the grid names each filter's limit. The same grid, as an RGB
array (grid_image), is what training logs to MLflow every few epochs.
"""

import math
import re
from pathlib import Path

import numpy as np

from pipeline.data.files import atomic_path
from pipeline.errors import ConfigError

GRID_FILE = "filters.png"
MLP_GRID_UNITS = 64


def check(export):
    """Refuse an export.cmap matplotlib does not know, before any training or drawing."""
    from matplotlib import colormaps

    if export.cmap not in colormaps:
        raise ConfigError(f"config export.cmap={export.cmap!r}: expected a matplotlib colormap name, "
                          "e.g. RdBu_r, coolwarm or seismic")


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


def limits(images, percentile):
    """Each image's symmetric colour limit: the `percentile` of its |values|, or its
    largest |value| where that percentile is 0 (a sparse filter), or 1 (all zero)."""
    flat = np.abs(np.asarray(images, dtype=np.float32).reshape(len(images), -1))
    if not len(flat):
        return np.zeros(0, dtype=np.float32)
    found, biggest = np.percentile(flat, percentile, axis=1), flat.max(axis=1)
    return np.where(found > 0, found, np.where(biggest > 0, biggest, 1.0)).astype(np.float32)


def _as_images(W):
    W = np.asarray(W, dtype=np.float32)
    side = int(round(W.shape[1] ** 0.5))
    return W.reshape(len(W), side, side)


def export_filters(W, titles, stems, out_dir, export):
    """Write <stem>.png for each row of W and a labelled grid; return the paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    images = _as_images(W)
    paths = []
    for stem, image, limit in zip(stems, images, limits(images, export.clip_percentile)):
        big = np.kron(image, np.ones((export.scale, export.scale), dtype=np.float32))
        path = out_dir / f"{stem}.png"
        with atomic_path(path) as tmp:  # symmetric limits put 0 at the map's centre
            plt.imsave(tmp, big, cmap=export.cmap, vmin=-limit, vmax=limit, format="png",
                       metadata={"Software": None})
        paths.append(path)
    fig = grid_figure(images, titles, export)
    with atomic_path(out_dir / GRID_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=export.dpi, metadata={"Software": None})
    plt.close(fig)
    return paths + [out_dir / GRID_FILE]


def grid_figure(images, titles, export, subtitle=None):
    """The filters in a grid of export.grid_cols columns (more for a big grid, so it
    stays square; fewer when there are fewer filters), each on its own symmetric
    scale, its limit in its title."""
    plt = _pyplot()
    n = len(images)
    cols = max(1, min(n, max(export.grid_cols, math.ceil(math.sqrt(n)))))
    rows = -(-n // cols)
    # Square cells, room for a title above each, the colour bar and the suptitle: no empty bands.
    cell, title = (1.9, 0.3) if n <= 16 else (1.2, 0.22)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.1, (cell + title) * rows + 0.45),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    for ax in axes.flat:
        ax.axis("off")
    small = n > 16
    for ax, title, image, limit in zip(axes.flat, titles, images, limits(images, export.clip_percentile)):
        shown = ax.imshow(image / limit, cmap=export.cmap, vmin=-1, vmax=1)
        ax.set_title(f"{title}  ±{limit:.2g}", fontsize=7 if small else 10, pad=2)
    bar = fig.colorbar(shown, ax=axes, shrink=0.8, aspect=25, pad=0.01, ticks=[-1, 0, 1])
    bar.ax.set_yticklabels(["−limit", "0", "+limit"])
    bar.set_label("weight, per filter (±limit in its title)")
    fig.suptitle("Filters: rows of the first weight matrix (red: evidence for, blue: against)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=11 if not small else 10)
    return fig


def grid_image(W, titles, export, subtitle=None):
    """The grid as an RGB uint8 array (height, width, 3), e.g. for mlflow.log_image."""
    plt = _pyplot()
    fig = grid_figure(_as_images(W), titles, export, subtitle)
    fig.set_dpi(export.dpi)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def live_grid_image(layers, class_names, export, to_host, subtitle=None):
    """grid_image of layers still on the device (training's per-epoch snapshot):
    only the drawn rows of the first W are copied to the host."""
    W, titles, _ = filters_of(layers, class_names)
    return grid_image(to_host(W), titles, export, subtitle)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
