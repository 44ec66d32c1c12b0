"""Each shipped dataset config fetches through its own sources, verifies, and
normalises into arrays whose manifest names it."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_cfg
from pipeline.data.splits import load_split, read_manifest
from pipeline.errors import PipelineError
from pipeline.fetch import fetch
from pipeline.normalise import normalise

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed "
                    "(.ci/run installs it: apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debians_package(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_LOCAL_DIR", raising=False)
    cfg = make_cfg("data=fashion_mnist")
    raw, processed = tmp_path / "raw" / "fashion_mnist", tmp_path / "processed"
    fetch(cfg.data, raw)  # the unset local source is skipped, the Debian directory supplies all four
    normalise(cfg.data, raw, processed)
    manifest = read_manifest(processed, cfg.data)
    assert manifest["dataset"] == "fashion_mnist"
    assert manifest["class_names"][0] == "T-shirt/top" and manifest["class_names"][9] == "Ankle boot"
    assert manifest["arrays"]["train"]["x"] == {"shape": [55000, 784], "dtype": "float32"}
    labels = np.concatenate([load_split(processed, "train")[1], load_split(processed, "val")[1]])
    assert np.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert np.bincount(load_split(processed, "test")[1]).tolist() == [1000] * 10

    mnist = make_cfg()  # the arrays are Fashion-MNIST: an MNIST config must not read them
    with pytest.raises(PipelineError) as info:
        read_manifest(processed, mnist.data)
    assert "'fashion_mnist'" in str(info.value) and "'mnist'" in str(info.value)
    assert json.loads((processed / "manifest.json").read_text())["raw_sha256"]["train_images"].startswith("c59f468a")
