"""Bad config fails before any work, naming the key; every config in conf/
composes and validates; the typed hyperparameters and the effective config."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import make_cfg
from pipeline.config import (CONF_DIR, DATASET_FILE, PROJECT_ROOT, RESOLVED_FILE, effective, hyperparams,
                             merge_effective, split_effective)
from pipeline.core.hparams import Hyperparams
from pipeline.errors import ConfigError, PipelineError

GROUPS = ("data", "model", "train", "backend")
GROUP_OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
GLOBAL_OPTIONS = [(group, path.stem) for group in ("experiment", "hparams_search")
                  for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def _written(group, option):
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)


def _assert_contains(composed, written, where):
    """Every value the yaml file writes is in the composed config (which also has
    the schema's defaults for what the file leaves out)."""
    if isinstance(written, dict):
        assert isinstance(composed, dict), where
        for key, value in written.items():
            assert key in composed, f"{where}.{key}"
            _assert_contains(composed[key], value, f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(composed, list) and len(composed) == len(written), where
        for i, (got, want) in enumerate(zip(composed, written)):
            _assert_contains(got, want, f"{where}[{i}]")
    else:
        assert composed == written, f"{where}: composed {composed!r}, the yaml says {written!r}"


def _composed(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


def test_default_config_composes_with_the_names_other_tools_rely_on():
    cfg = make_cfg()
    assert cfg.train.lr > 0 and cfg.train.epochs >= 1 and cfg.train.batch_size >= 1
    assert isinstance(cfg.seed, int)
    assert cfg.model.name == "softmax" and cfg.backend.name == "auto" and cfg.data.name == "mnist"
    assert cfg.backend.fast is True  # the speed path unless switched off
    assert cfg.data.files.train_images.size == 47040016 and cfg.data.sources[1].kind == "http"


def test_the_conf_directory_has_the_options_the_docs_name():
    assert {"data=mnist", "model=softmax", "model=mlp", "train=sgd", "backend=numpy", "backend=cupy",
            "backend=auto"} <= {f"{g}={o}" for g, o in GROUP_OPTIONS}
    assert {"experiment=softmax", "experiment=mlp", "hparams_search=lr_optuna"} <= \
        {f"{g}={o}" for g, o in GLOBAL_OPTIONS}


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = make_cfg(f"{group}={option}")  # make_cfg validates
    _assert_contains(_composed(cfg)[group], _written(group, option), group)


@pytest.mark.parametrize("group, option", GLOBAL_OPTIONS, ids=[f"{g}={o}" for g, o in GLOBAL_OPTIONS])
def test_every_experiment_and_search_composes_and_validates(group, option):
    """experiment/ and hparams_search/ files are `@package _global_`: their keys land
    at the top, and their `override /group: option` defaults select other files."""
    written = _written(group, option)
    defaults = written.pop("defaults", [])
    cfg = make_cfg(f"{group}={option}")  # make_cfg validates
    # The sweeper settings live in the hydra node, which a stage's cfg leaves out;
    # compose keeps it on request (the `-m` only decides whether Hydra sweeps).
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        full = _composed(compose("config", overrides=[f"{group}={option}"], return_hydra_config=True))
    _assert_contains(full, written, group)
    for entry in defaults:
        ((key, chosen),) = entry.items()
        target = key.removeprefix("override ").strip("/")
        if target.startswith("hydra/"):  # e.g. hydra/sweeper: optuna
            assert chosen in full["hydra"][target.split("/")[1]]["_target_"].lower(), key
        else:
            _assert_contains(_composed(cfg)[target], {k: v for k, v in _written(target, chosen).items()
                                                       if k not in written.get(target, {})}, target)
    if group == "hparams_search":
        assert "train.lr" in full["hydra"]["sweeper"]["params"]
        assert cfg.train == make_cfg().train  # only the sweeper changes; the trials override train.lr


def test_hyperparams_are_the_typed_yaml_values():
    sgd = _written("train", "sgd")
    hp = hyperparams(make_cfg())
    assert type(hp) is Hyperparams
    assert hp == Hyperparams(**sgd)
    assert hp.problems() == []
    mlp = hyperparams(make_cfg("experiment=mlp"))
    assert mlp == Hyperparams(**dict(sgd, **_written("experiment", "mlp")["train"]))
    assert (mlp.lr, mlp.momentum, mlp.schedule) == (0.05, 0.9, "cosine")
    overridden = hyperparams(make_cfg("train.lr=0.5", "train.batch_size=1"))
    assert overridden == Hyperparams(**dict(sgd, lr=0.5, batch_size=1))
    assert isinstance(overridden.lr, float) and isinstance(overridden.batch_size, int)


def test_hyperparams_are_a_copy_of_the_config():
    cfg = make_cfg()
    hp = hyperparams(cfg)
    hp.lr = 123.0
    assert cfg.train.lr == _written("train", "sgd")["lr"]


def test_effective_config_leaves_out_what_never_changes_a_result():
    cfg = make_cfg()
    values = effective(cfg)
    assert not {"paths", "mlflow", "evaluate_after_train"} & set(values)
    assert not {"sources", "timeout_s"} & set(values["data"])
    expected = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "mlflow", "evaluate_after_train"):
        del expected[key]
    for key in ("sources", "timeout_s"):
        del expected["data"][key]
    del expected["export"]["log_every_epochs"]  # how often train logs pictures to MLflow
    assert values == expected  # nothing else left out
    assert set(values) == {"data", "model", "train", "backend", "export", "seed"}
    assert json.loads(json.dumps(values)) == values  # plain data
    assert "paths" in cfg and "sources" in cfg.data  # the config itself is untouched


def test_effective_config_changes_with_results_only():
    default = effective(make_cfg())
    local = make_cfg("paths.model=/elsewhere", "paths.processed=/elsewhere/p", "mlflow.experiment=other",
                     "data.timeout_s=5", "evaluate_after_train=false", "data.sources=[{kind: local, path: /x}]",
                     "export.log_every_epochs=1")
    assert effective(local) == default
    for override in ("train.lr=0.5", "seed=1", "backend.fast=false", "data.val_size=100", "model=mlp"):
        assert effective(make_cfg(override)) != default, override


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


@pytest.mark.parametrize("dataset", [option for group, option in GROUP_OPTIONS if group == "data"])
def test_the_resolved_files_split_the_effective_config_without_loss_or_overlap(dataset):
    values = effective(make_cfg(f"data={dataset}"))
    files = split_effective(values)
    assert list(files) == [RESOLVED_FILE, DATASET_FILE]
    resolved, dataset_keys = _flat(files[RESOLVED_FILE]), _flat(files[DATASET_FILE])
    assert not set(resolved) & set(dataset_keys)
    assert {**resolved, **dataset_keys} == _flat(values)
    assert set(files[DATASET_FILE]["data"]) == {"files", "class_names"}
    assert list(files[RESOLVED_FILE])[:2] == ["train", "model"]  # the file reads hyperparameters first
    assert merge_effective(files) == values


@pytest.mark.parametrize("file, key, value", [
    (RESOLVED_FILE, "train.lr", 0.07),
    (RESOLVED_FILE, "data.val_size", 7),
    (DATASET_FILE, "data.files.train_images.sha256", "0" * 64),
    (DATASET_FILE, "data.class_names", list("abcdefghij")),
])
def test_a_stage_refuses_either_resolved_file_when_it_differs_from_conf(tmp_path, monkeypatch, file, key, value):
    from pipeline import entry

    cfg = make_cfg()
    files = split_effective(effective(cfg))
    node = files[file]
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(yaml.safe_dump(content))
    monkeypatch.setattr(entry, "PROJECT_ROOT", tmp_path)
    with pytest.raises(PipelineError, match=rf"{re.escape(key)} \(conf/: .*, file: {re.escape(repr(value))}\)"):
        entry.check_resolved(cfg)
    (tmp_path / file).write_text("")  # a file emptied by hand: no config in it
    with pytest.raises(PipelineError, match=r"do not hold a config .*: run `dvc repro`"):
        entry.check_resolved(cfg)
    (tmp_path / file).unlink()
    with pytest.raises(PipelineError, match=rf"{re.escape(str(tmp_path / file))} is missing: run `dvc repro`"):
        entry.check_resolved(cfg)


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-0.1", "train.lr"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.momentum=1.0", "train.momentum"),
    ("train.nesterov=true", "train.nesterov"),  # without momentum
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.schedule=linear", "train.schedule"),
    ("train.gamma=0", "train.gamma"),
    ("train.step_epochs=0", "train.step_epochs"),
    ("data.val_size=0", "data.val_size"),
    ("backend.threads=0", "backend.threads"),
    ("backend.name=tpu", "backend.name"),
    ("model.hidden=[16]", "model.hidden"),  # softmax has no hidden layer
    # Values that once got through: accepted until epoch 1, or a NumPy traceback.
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("train.momentum=nan", "train.momentum"),
    ("train.gamma=nan", "train.gamma"),
    ("seed=-1", "seed"),
    ("data.timeout_s=0", "data.timeout_s"),
    ("data.timeout_s=inf", "data.timeout_s"),
    ("export.dpi=0", "export.dpi"),
    ("export.grid_cols=0", "export.grid_cols"),
    ("export.scale=0", "export.scale"),
    ("export.clip_percentile=0", "export.clip_percentile"),
    ("export.clip_percentile=101", "export.clip_percentile"),
    ("export.log_every_epochs=-1", "export.log_every_epochs"),
    ("mlflow.experiment=' '", "mlflow.experiment"),
])
def test_out_of_range_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        make_cfg(override)


def test_an_unknown_colormap_is_refused_by_the_stages_that_draw():
    from pipeline.report import filters

    filters.check(make_cfg().export)  # the default draws
    with pytest.raises(ConfigError, match=r"export\.cmap='Rainbowz'.*matplotlib colormap"):
        filters.check(make_cfg("export.cmap=Rainbowz").export)


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
    # A wrong type is Hydra's composition error, a value out of range ours: both exit 2, no traceback.
    for override, key, status in (("train.lr=-1", "train.lr", 2), ("train.epochs=1.5", "train.epochs", 2),
                                  ("train.lr=inf", "train.lr", 2), ("seed=-1", "seed", 2)):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.train", override, f"hydra.run.dir={tmp_path}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == status, done.stderr[-2000:]
        assert key in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "model.npz").exists()
