"""Stage 2, normalise: IDX -> float32 pixels in [0, 1], flattened to 784, as .npy.

The canonical order is kept; the last `data.val_size` training images become
the validation set. The .npy files load fast and can be memory-mapped, and
the same input gives byte-identical output.
"""

import logging
from pathlib import Path

import hydra
import numpy as np

from pipeline.config import CONF_DIR, output_dir, validate
from pipeline.errors import PipelineError, exit_on_pipeline_error
from pipeline.files import save_npy
from pipeline.idx import IdxError, read_images, read_labels

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
PIXEL_MAX = 255  # an 8-bit pixel k becomes k / PIXEL_MAX in float32


def normalise(data, raw_dir, out_dir):
    raw_dir, num_classes = Path(raw_dir), len(data.class_names)
    train_x, train_y = _read_pair(raw_dir, data.files.train_images, data.files.train_labels, num_classes)
    test_x, test_y = _read_pair(raw_dir, data.files.test_images, data.files.test_labels, num_classes)
    if not 1 <= data.val_size < len(train_y):
        raise PipelineError(
            f"config data.val_size={data.val_size}: expected 1 <= val_size < {len(train_y)} "
            "(the number of training images)"
        )
    cut = len(train_y) - data.val_size
    splits = {
        "train": (train_x[:cut], train_y[:cut]),
        "val": (train_x[cut:], train_y[cut:]),
        "test": (test_x, test_y),
    }
    for name, (x, y) in splits.items():
        save_npy(Path(out_dir) / f"{name}_x.npy", x)
        save_npy(Path(out_dir) / f"{name}_y.npy", y)
        log.info("%s: %d images -> %s", name, len(y), out_dir)


def _read_pair(raw_dir, images_spec, labels_spec, num_classes):
    images_path, labels_path = raw_dir / images_spec.name, raw_dir / labels_spec.name
    for path in (images_path, labels_path):
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run the fetch stage first (dvc repro)")
    images = read_images(images_path)
    labels = read_labels(labels_path, num_classes)
    if len(images) != len(labels):
        raise IdxError(labels_path, "count", f"{len(images)} (the image count of {images_path.name})", len(labels))
    pixels = images.reshape(len(images), -1).astype(np.float32) / np.float32(PIXEL_MAX)
    return pixels, labels


def load_split(processed_dir, split, mmap=False):
    """(x float32 (n, 784), y uint8 (n,)) of one split written by normalise."""
    paths = [Path(processed_dir) / f"{split}_{part}.npy" for part in ("x", "y")]
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run the normalise stage first (dvc repro)")
    mode = "r" if mmap else None
    return tuple(np.load(path, mmap_mode=mode, allow_pickle=False) for path in paths)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    normalise(cfg.data, cfg.paths.raw, output_dir())


if __name__ == "__main__":
    main()
