"""Bad config fails before any work, naming the key."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from conftest import make_cfg
from pipeline.config import PROJECT_ROOT, flatten
from pipeline.errors import PipelineError


def test_default_config_composes_with_the_names_other_tools_rely_on():
    cfg = make_cfg()
    assert cfg.train.lr > 0 and cfg.train.epochs >= 1 and cfg.train.batch_size >= 1
    assert isinstance(cfg.seed, int)
    assert cfg.model.name == "softmax" and cfg.backend.name == "numpy" and cfg.data.name == "mnist"
    flat = flatten(cfg)
    assert flat["train.lr"] == str(cfg.train.lr) and flat["data.files.train_images.size"] == "47040016"


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-0.1", "train.lr"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.val_size=0", "data.val_size"),
])
def test_out_of_range_values_are_refused(override, key):
    with pytest.raises(PipelineError, match=key.replace(".", r"\.")):
        make_cfg(override)


@pytest.mark.parametrize("override, named", [
    ("train.lr=abc", "train.lr"),  # wrong type
    ("train.epochs=1.5", "train.epochs"),  # wrong type
    ("train.learning_rate=0.1", "learning_rate"),  # misspelled key
    ("model=foo", "model/foo"),  # no conf/model/foo.yaml
])
def test_wrong_types_unknown_keys_and_options_are_refused(override, named):
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg(override)
    assert named in f"{info.value} {info.value.__cause__}"


def test_the_cli_exits_nonzero_with_the_key_before_doing_work(tmp_path):
    for override, key in (("train.lr=-1", "train.lr"), ("train.epochs=1.5", "train.epochs")):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.train", override, f"hydra.run.dir={tmp_path}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode != 0
        assert key in done.stderr
        assert not (tmp_path / "model.npz").exists()
