"""Stage 2, normalise: IDX -> float32 pixels in [0, 1], flattened to 784, as .npy,
with a manifest of what they were made from.

The canonical order is kept; the last `data.val_size` training images become
the validation set. The .npy files load fast and can be memory-mapped, and
the same input gives byte-identical output.
"""

import logging
from pathlib import Path

import numpy as np

from pipeline.data.files import sha256_of
from pipeline.data.idx import IdxError, read_images, read_labels
from pipeline.data.splits import PIXEL_MAX, save_splits
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


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
    manifest = {"dataset": data.name, "val_size": data.val_size, "class_names": list(data.class_names),
                "raw_sha256": {key: sha256_of(raw_dir / spec.name) for key, spec in data.files.items()}}
    save_splits(out_dir, splits, manifest)
    for name, (_, y) in splits.items():
        log.info("%s: %d images of %s -> %s", name, len(y), data.name, out_dir)


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


@stage
def main(cfg):
    normalise(cfg.data, Path(cfg.paths.raw) / cfg.data.name, output_dir())


if __name__ == "__main__":
    main()
