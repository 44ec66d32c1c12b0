"""model.npz: the trained layers and the resolved config they were trained with,
with no pickled objects (a model file must never run code when loaded)."""

import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data.files import save_npz
from pipeline.errors import PipelineError

FILE = "model.npz"  # the file name train writes and evaluate/export_filters read


def save(path, layers, config):
    """One layer (softmax regression) is stored as W and b, an MLP as W0, b0, W1, ..."""
    names = [("W", "b")] if len(layers) == 1 else [(f"W{i}", f"b{i}") for i in range(len(layers))]
    arrays = {name: array for pair, layer in zip(names, layers) for name, array in zip(pair, layer)}
    save_npz(path, dict(arrays, config=np.array(json.dumps(config, sort_keys=True))))


def load(path):
    """(layers, config dict) of a model written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the train stage first (dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "W" in npz:
                layers = [(npz["W"], npz["b"])]
            else:
                layers = [(npz[f"W{i}"], npz[f"b{i}"]) for i in range(len(npz.files) // 2)]
            return layers, json.loads(str(npz["config"]))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"{path}: not a model written by the train stage ({err}); run train again (dvc repro)"
        ) from err
