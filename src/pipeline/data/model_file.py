"""model.npz: the trained layers and the resolved config they were trained with,
with no pickled objects (a model file must never run code when loaded)."""

import json
import re
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


def load(path, *, n_features=None, n_classes=None, hidden=None):
    """(layers, config dict) of a model written by `save`, checked: every W_i
    float32 (out, in) and b_i float32 (out,), each layer's inputs the previous
    layer's outputs, every weight finite, the config a JSON object. When given,
    the first layer's inputs must be `n_features` (the data's pixels), the last
    layer's outputs `n_classes` and the hidden sizes `hidden` (the config's
    model.hidden). Raises a PipelineError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the train stage first (dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if "config" not in names:
                raise PipelineError(f"{path}: no config entry (the resolved config the model was trained "
                                    f"with); {_RETRAIN}")
            numbered = [int(name[1:]) for name in names if re.fullmatch(r"[Wb][0-9]{1,4}", name)]
            pairs = [("W", "b")] if "W" in names or "b" in names else [
                (f"W{i}", f"b{i}") for i in range(max(numbered, default=-1) + 1)]
            unexpected = names - {"config"} - {name for pair in pairs for name in pair}
            missing = sorted(name for pair in pairs for name in pair if name not in names)
            if not pairs or unexpected or missing:
                found = ", ".join(sorted(names))
                raise PipelineError(f"{path}: entries {found}; expected W, b, config (softmax) or W0, b0, "
                                    f"W1, b1, ..., config (mlp){' - missing ' + ', '.join(missing) if missing else ''}"
                                    f"; {_RETRAIN}")
            layers = [(npz[w], npz[b]) for w, b in pairs]
            config_text = npz["config"]
        config = json.loads(str(config_text))
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"{path}: not a model written by the train stage ({err}); run train again (dvc repro)"
        ) from err
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: the config entry is a JSON {type(config).__name__}, expected an object; "
                            f"{_RETRAIN}")
    _check_layers(path, layers, pairs)
    _check_against(path, layers, n_features, n_classes, hidden)
    return layers, config


_RETRAIN = "the file is damaged or was not written by the train stage: train again (`dvc repro`)"


def _check_layers(path, layers, pairs):
    previous_out = None
    for (W, b), (w_name, b_name) in zip(layers, pairs):
        for name, array, ndim in ((w_name, W, 2), (b_name, b, 1)):
            if array.dtype != np.float32:
                raise PipelineError(f"{path}: {name} is {array.dtype}, expected float32; {_RETRAIN}")
            if array.ndim != ndim:
                raise PipelineError(f"{path}: {name} has shape {array.shape}, expected "
                                    f"{'(outputs, inputs)' if ndim == 2 else '(outputs,)'}; {_RETRAIN}")
        if b.shape[0] != W.shape[0]:
            raise PipelineError(f"{path}: {b_name} has shape {b.shape}, expected ({W.shape[0]},) to match "
                                f"{w_name} {W.shape} (outputs, inputs); {_RETRAIN}")
        if previous_out is not None and W.shape[1] != previous_out:
            raise PipelineError(f"{path}: {w_name} has shape {W.shape}: {W.shape[1]} inputs, expected "
                                f"{previous_out}, the outputs of the layer before; {_RETRAIN}")
        for name, array in ((w_name, W), (b_name, b)):
            if not np.isfinite(array).all():
                count = int(array.size - np.isfinite(array).sum())
                raise PipelineError(f"{path}: {name} holds {count} non-finite value(s) (NaN or inf), expected "
                                    f"finite weights; {_RETRAIN}")
        previous_out = W.shape[0]


def _check_against(path, layers, n_features, n_classes, hidden):
    found_hidden = [W.shape[0] for W, _ in layers[:-1]]
    found = f"layers {[tuple(W.shape) for W, _ in layers]} (outputs, inputs): {layers[0][0].shape[1]} inputs, " \
            f"hidden {found_hidden}, {layers[-1][0].shape[0]} classes"
    problems = []
    if n_features is not None and layers[0][0].shape[1] != n_features:
        problems.append(f"{n_features} inputs (the pixels per image of the data)")
    if n_classes is not None and layers[-1][0].shape[0] != n_classes:
        problems.append(f"{n_classes} classes (data.class_names)")
    if hidden is not None and found_hidden != [int(h) for h in hidden]:
        problems.append(f"hidden {[int(h) for h in hidden]} (model.hidden)")
    if problems:
        model_hint = "model=mlp" if found_hidden else "model=softmax"
        raise PipelineError(
            f"{path}: {found}; expected {', '.join(problems)}. The model was trained for another dataset or "
            f"model: train it again with this config (`dvc repro`), or select the model it was trained as "
            f"({model_hint}) and the data it was trained on.")
