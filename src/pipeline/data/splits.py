"""Processed splits: train/val/test as .npy arrays, and the manifest beside them.

The manifest says what the arrays were made from (dataset name, the SHA-256 of
each raw file, val_size, class names) and what they are (shape and dtype of
each array). train and evaluate compare it with their config before reading
the arrays, ad hoc runs included, so a model is never trained on one dataset
and labelled with another.
"""

import json
from pathlib import Path

import numpy as np

from pipeline.data.files import save_npy, write_text
from pipeline.errors import PipelineError

SPLIT_NAMES = ("train", "val", "test")
PIXEL_MAX = 255  # an 8-bit pixel k is stored as k / PIXEL_MAX in float32
MANIFEST = "manifest.json"


def save_splits(out_dir, splits, manifest):
    """Write each split's x and y, then the manifest (last: its presence says the arrays are complete)."""
    out_dir = Path(out_dir)
    shapes = {}
    for name, (x, y) in splits.items():
        save_npy(out_dir / f"{name}_x.npy", x)
        save_npy(out_dir / f"{name}_y.npy", y)
        shapes[name] = {"x": {"shape": list(x.shape), "dtype": str(x.dtype)},
                        "y": {"shape": list(y.shape), "dtype": str(y.dtype)}}
    write_text(out_dir / MANIFEST, json.dumps(dict(manifest, arrays=shapes), indent=2, sort_keys=True) + "\n")


def expected_manifest(data):
    """What the manifest must say for the config's data group."""
    return {"dataset": data.name, "raw_sha256": {key: spec.sha256 for key, spec in data.files.items()},
            "val_size": data.val_size, "class_names": list(data.class_names)}


def read_manifest(processed_dir, data):
    """The manifest of processed_dir, checked against the data config; raises if they disagree."""
    path = Path(processed_dir) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the normalise stage first (dvc repro)")
    manifest = json.loads(path.read_text())
    expected = expected_manifest(data)
    wrong = [key for key in expected if manifest.get(key) != expected[key]]
    if wrong:
        lines = [f"  {key}: the arrays were made with {manifest.get(key)!r}, the config says {expected[key]!r}"
                 for key in wrong]
        raise PipelineError(
            f"{path} does not match the config's data group (data={data.name}):\n" + "\n".join(lines)
            + f"\nSelect data: {data.name} in conf/config.yaml and run `dvc repro` (it fetches and "
            "normalises that dataset), or point paths.processed at arrays normalise made from it."
        )
    return manifest


def load_split(processed_dir, split, mmap=False):
    """(x float32 (n, 784), y uint8 (n,)) of one split written by save_splits."""
    paths = [Path(processed_dir) / f"{split}_{part}.npy" for part in ("x", "y")]
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run the normalise stage first (dvc repro)")
    mode = "r" if mmap else None
    return tuple(np.load(path, mmap_mode=mode, allow_pickle=False) for path in paths)
