"""Every way a user changes config, in a temporary git + DVC copy of this repository:
`dvc status` sees it, `dvc repro` reruns exactly the stages whose effective values
changed, and the outputs match conf/ afterwards.

The copy trains on two small synthetic datasets in the real IDX format (conf/data/
fixture_a.yaml, fixture_b.yaml, local sources), 2 epochs, so each case takes seconds.
A baseline copy is built and reproduced once (conftest.dvc_baseline); each case
starts from a copy of it (dvc_work).
"""

import hashlib
import subprocess

import pytest
import yaml

from conftest import CLASSES, edit, run_ok, stages_run
from pipeline.data import model_file

ALL = ["resolve", "fetch", "normalise", "train", "evaluate", "export_filters"]
FROM_TRAIN = ["resolve", "train", "evaluate", "export_filters"]


def _repro(repo, env, expected):
    """`dvc status` reports the change, `dvc repro` runs exactly `expected`, then all is up to date."""
    status = run_ok(["dvc", "status"], repo, env)
    assert ("up to date" in status) == (expected == []), status
    out = run_ok(["dvc", "repro"], repo, env)
    assert stages_run(out) == expected, out
    assert "Data and pipelines are up to date" in run_ok(["dvc", "status"], repo, env)
    return out


def _trained_with(repo):
    return model_file.load(repo / "models/model.npz")[1]


def _resolved(repo):
    return yaml.safe_load((repo / "params/resolved.yaml").read_text())


def _digests(repo, *paths):
    return {p: hashlib.sha256((repo / p).read_bytes()).hexdigest() for p in paths}


def test_edit_a_key_of_a_selected_file(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/train/sgd.yaml", r"^lr: .*$", "lr: 0.05")
    _repro(repo, env, FROM_TRAIN)
    assert _trained_with(repo)["train"]["lr"] == 0.05
    diff = run_ok(["dvc", "params", "diff"], repo, env)  # effective values, against the last commit
    assert "params/resolved.yaml" in diff and "train.lr" in diff and "0.2" in diff and "0.05" in diff


def test_switch_a_group_then_edit_its_selected_non_default_file(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/config.yaml", r"^  - model: softmax$", "  - model: mlp")
    _repro(repo, env, FROM_TRAIN)
    layers, config = model_file.load(repo / "models/model.npz")
    assert config["model"] == {"name": "mlp", "hidden": [256]} and layers[0][0].shape == (256, 784)
    assert len(list((repo / "filters").glob("unit_*.png"))) == 64

    edit(repo / "conf/model/mlp.yaml", r"^hidden: .*$", "hidden: [24]")
    _repro(repo, env, FROM_TRAIN)
    layers, config = model_file.load(repo / "models/model.npz")
    assert config["model"]["hidden"] == [24] and layers[0][0].shape == (24, 784)
    assert len(list((repo / "filters").glob("unit_*.png"))) == 24  # no stale filter of the 256 units

    edit(repo / "conf/model/softmax.yaml", r"^hidden: .*$", "hidden: []  # edited")  # not selected
    _repro(repo, env, ["resolve"])


def test_select_a_non_default_backend_file_then_edit_it(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/config.yaml", r"^  - backend: auto$", "  - backend: numpy")
    _repro(repo, env, FROM_TRAIN)  # the config saved in model.npz changed
    edit(repo / "conf/backend/numpy.yaml", r"^threads: .*$", "threads: 2")
    _repro(repo, env, FROM_TRAIN)
    assert _trained_with(repo)["backend"]["threads"] == 2


def test_edit_a_file_that_is_not_selected_reruns_nothing_after_resolve(dvc_work):
    repo, env = dvc_work
    before = _digests(repo, "params/resolved.yaml", "models/model.npz")
    edit(repo / "conf/model/mlp.yaml", r"^hidden: .*$", "hidden: [17]")
    edit(repo / "conf/backend/cupy.yaml", r"^threads: .*$", "threads: 3")
    edit(repo / "conf/experiment/mlp.yaml", r"^  epochs: .*$", "  epochs: 7")
    _repro(repo, env, ["resolve"])
    assert _digests(repo, "params/resolved.yaml", "models/model.npz") == before


def test_select_an_experiment_then_edit_it(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/config.yaml", r"^  - experiment: null$", "  - experiment: softmax")
    _repro(repo, env, FROM_TRAIN)
    assert _trained_with(repo)["train"]["schedule"] == "cosine"
    edit(repo / "conf/experiment/softmax.yaml", r"^  epochs: .*$", "  epochs: 3")
    _repro(repo, env, FROM_TRAIN)
    assert _trained_with(repo)["train"]["epochs"] == 3
    assert len((repo / "models/history.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("file, pattern, replacement", [
    ("conf/config.yaml", r"^  experiment: mnist$", "  experiment: elsewhere"),  # mlflow.experiment
    ("conf/config.yaml", r"^  model: models$", "  model: somewhere/else"),  # paths: ad hoc runs only
    ("conf/data/fixture_a.yaml", r"^timeout_s: .*$", "timeout_s: 9"),
], ids=["mlflow-experiment", "paths", "data-timeout"])
def test_a_key_that_is_no_stages_param_reruns_nothing_after_resolve(dvc_work, file, pattern, replacement):
    repo, env = dvc_work
    before = _digests(repo, "params/resolved.yaml")
    edit(repo / file, pattern, replacement)
    _repro(repo, env, ["resolve"])
    assert _digests(repo, "params/resolved.yaml") == before
    run_ok(["dvc", "repro", "-f", "-s", "evaluate"], repo, env)  # DVC's paths come from dvc.yaml


def test_a_key_only_export_uses_reruns_only_export(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/config.yaml", r"^  cmap: RdBu_r$", "  cmap: PiYG")
    _repro(repo, env, ["resolve", "export_filters"])
    assert _resolved(repo)["export"]["cmap"] == "PiYG"


def test_change_a_schema_default(dvc_work):
    repo, env = dvc_work
    edit(repo / "src/pipeline/config.py", r"^    fast: bool = True$", "    fast: bool = False")
    env = dict(env, PYTHONPATH=str(repo / "src"))  # the copy's code, not the checkout's
    _repro(repo, env, FROM_TRAIN)
    assert _resolved(repo)["backend"]["fast"] is False and _trained_with(repo)["backend"]["fast"] is False


def test_switch_the_dataset_reruns_everything_and_labels_follow_the_data(dvc_work):
    repo, env = dvc_work
    edit(repo / "conf/config.yaml", r"^  - data: fixture_a$", "  - data: fixture_b")
    _repro(repo, env, ALL)
    manifest = yaml.safe_load((repo / "data/processed/manifest.json").read_text())
    assert manifest["dataset"] == "fixture_b" and manifest["class_names"] == CLASSES["fixture_b"]
    assert _trained_with(repo)["data"]["name"] == "fixture_b"
    assert set(yaml.safe_load((repo / "reports/per_class.json").read_text())["test"]["recall"]) == set(
        CLASSES["fixture_b"])
    assert sorted(p.name for p in (repo / "filters").glob("filter_*.png")) == sorted(
        f"filter_{i}_c{i}-x.png" for i in range(10))  # a '/' in a class name makes no directory
    assert {p.name for p in (repo / "data/raw").iterdir()} == {"fixture_a", "fixture_b"}

    edit(repo / "conf/config.yaml", r"^  - data: fixture_b$", "  - data: fixture_a")
    out = run_ok(["dvc", "repro"], repo, env)  # back: fetch finds its files verified and fetches nothing,
    assert stages_run(out)[:3] == ["resolve", "fetch", "normalise"] and "train" not in stages_run(out)
    assert "Stage 'train' is cached - skipping run" in out  # and DVC's run cache has the model
    assert _trained_with(repo)["data"]["name"] == "fixture_a"


@pytest.mark.parametrize("file, pattern, replacement, key", [
    ("conf/train/sgd.yaml", r"^lr: .*$", "lr: -1", "train.lr=-1"),
    ("conf/model/softmax.yaml", r"^hidden: .*$", "hidden: [5]", "model.hidden=[5]"),
    ("conf/train/sgd.yaml", r"^epochs: .*$", "epochs: many", "epochs"),
    ("conf/data/fixture_a.yaml", r"^val_size: .*$", "val_size: 0", "data.val_size=0"),
    ("conf/data/fixture_a.yaml", r"^val_size: .*$", "val_size: 600", "data.val_size=600"),  # all 600 images
    ("conf/train/sgd.yaml", r"^batch_size: .*$", "batch_size: 501", "train.batch_size=501"),  # 500 to train
], ids=["negative-lr", "softmax-hidden", "wrong-type", "val-size", "val-size-too-big", "batch-too-big"])
def test_a_bad_value_fails_before_anything_is_deleted(dvc_work, file, pattern, replacement, key):
    repo, env = dvc_work
    kept = ["params/resolved.yaml", "models/model.npz", "models/history.csv", "reports/metrics.json",
            "data/processed/train_x.npy", "filters/filters.png"]
    before = _digests(repo, *kept)
    edit(repo / file, pattern, replacement)
    done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert key in done.stdout + done.stderr
    assert stages_run(done.stdout + done.stderr) == ["resolve"]
    assert _digests(repo, *kept) == before


def test_a_single_stage_run_against_a_stale_resolved_file_refuses_and_keeps_the_model(dvc_work):
    repo, env = dvc_work
    before = _digests(repo, "models/model.npz", "models/history.csv")
    edit(repo / "conf/train/sgd.yaml", r"^lr: .*$", "lr: 0.07")
    # Without resolve, DVC sees no change in train's params; forced, train must refuse.
    assert "didn't change" in run_ok(["dvc", "repro", "-s", "train"], repo, env)
    done = subprocess.run(["dvc", "repro", "-s", "-f", "train"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "train.lr" in output and "0.07" in output and "dvc repro" in output
    run_ok(["dvc", "checkout", "train"], repo, env)  # DVC removed the outputs before the stage refused
    assert _digests(repo, "models/model.npz", "models/history.csv") == before
