"""Each stage on the small synthetic fixture in real IDX format."""

import csv
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import FIXTURE_TEST, FIXTURE_TRAIN, FIXTURE_VAL, make_cfg, raw_dir
from conftest import prepare as _prepare
from pipeline import train
from pipeline.config import PROJECT_ROOT, SourceSpec, trained_with
from pipeline.data import model_file
from pipeline.data.files import sha256_of
from pipeline.data.splits import MANIFEST, load_split, read_manifest
from pipeline.errors import PipelineError
from pipeline.fetch import fetch
from pipeline.normalise import normalise
from pipeline.report import evaluation, filters
from pipeline.tracking import runs
from pipeline.tracking.runs import tracking_uri


def test_fetch_installs_verified_files_and_keeps_them(fixture_cfg, tmp_path):
    fetch(fixture_cfg.data, tmp_path / "raw")
    for spec in fixture_cfg.data.files.values():
        assert sha256_of(tmp_path / "raw" / spec.name) == spec.sha256
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "raw").iterdir()}
    fetch(fixture_cfg.data, tmp_path / "raw")  # already verified: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "raw").iterdir()} == stamp


def test_fetch_falls_through_a_bad_source_and_lists_every_failure(fixture_cfg, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for spec in fixture_cfg.data.files.values():
        (bad / spec.name).write_bytes(b"not the right bytes")
    good = fixture_cfg.data.sources[0].path
    fixture_cfg.data.sources = [SourceSpec("local", path=str(bad)), SourceSpec("local", path=good)]
    fetch(fixture_cfg.data, tmp_path / "raw")  # the bad copy fails its checksum, the good one is used
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        s.name for s in fixture_cfg.data.files.values())  # no temporary or unverified file left

    fixture_cfg.data.sources = [SourceSpec("local", path=str(bad)),
                                SourceSpec("local", path=str(tmp_path / "nowhere"))]
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, tmp_path / "raw2")
    message = str(info.value)
    assert "checksum mismatch" in message and str(bad) in message
    assert str(tmp_path / "nowhere") in message
    assert list((tmp_path / "raw2").iterdir()) == []


def test_normalise_scales_splits_and_is_byte_identical(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    train_x, train_y = load_split(fixture_cfg.paths.processed, "train")
    val_x, val_y = load_split(fixture_cfg.paths.processed, "val")
    test_x, _ = load_split(fixture_cfg.paths.processed, "test")
    assert train_x.shape == (FIXTURE_TRAIN - FIXTURE_VAL, 784) and train_x.dtype == np.float32
    assert val_x.shape == (FIXTURE_VAL, 784) and test_x.shape == (FIXTURE_TEST, 784)
    assert train_y.dtype == np.uint8
    assert train_x.min() >= 0.0 and train_x.max() == 1.0  # the bars are 255 -> 1.0
    # canonical order: the validation set is the end of the training file
    from pipeline.data.idx import read_images
    raw = read_images(raw_dir(fixture_cfg) / fixture_cfg.data.files.train_images.name)
    np.testing.assert_array_equal(val_x, raw[-FIXTURE_VAL:].reshape(FIXTURE_VAL, 784) / np.float32(255))
    first = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
    assert MANIFEST in first
    normalise(fixture_cfg.data, raw_dir(fixture_cfg), tmp_path / "again")
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()} == first


def test_normalise_writes_a_manifest_of_what_the_arrays_were_made_from(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    manifest = json.loads((tmp_path / "processed" / MANIFEST).read_text())
    data = fixture_cfg.data
    assert manifest["dataset"] == data.name and manifest["val_size"] == FIXTURE_VAL
    assert manifest["class_names"] == list(data.class_names)
    assert manifest["raw_sha256"] == {key: sha256_of(raw_dir(fixture_cfg) / spec.name)
                                      for key, spec in data.files.items()}
    assert manifest["raw_sha256"] == {key: spec.sha256 for key, spec in data.files.items()}
    assert manifest["arrays"]["train"]["x"] == {"shape": [FIXTURE_TRAIN - FIXTURE_VAL, 784], "dtype": "float32"}
    assert manifest["arrays"]["val"]["y"] == {"shape": [FIXTURE_VAL], "dtype": "uint8"}
    assert manifest["arrays"]["test"]["x"] == {"shape": [FIXTURE_TEST, 784], "dtype": "float32"}
    assert read_manifest(tmp_path / "processed", data) == manifest


def test_the_fetch_and_normalise_stages_keep_a_directory_per_dataset(fixture_overrides, fixture_cfg, tmp_path):
    """The fetch stage writes <its output dir>/<data.name>/, the normalise stage reads <paths.raw>/<data.name>/."""
    for module, out in (("pipeline.fetch", tmp_path / "raw"), ("pipeline.normalise", tmp_path / "processed")):
        done = subprocess.run([sys.executable, "-m", module, *fixture_overrides, f"hydra.run.dir={out}",
                               "hydra.output_subdir=null", "hydra/job_logging=stdout"],
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [fixture_cfg.data.name]
    assert sorted(p.name for p in raw_dir(fixture_cfg).iterdir()) == sorted(
        spec.name for spec in fixture_cfg.data.files.values())
    assert read_manifest(tmp_path / "processed", fixture_cfg.data)["dataset"] == fixture_cfg.data.name


def test_normalise_refuses_a_validation_set_as_big_as_the_training_set(fixture_cfg, tmp_path):
    fetch(fixture_cfg.data, raw_dir(fixture_cfg))
    fixture_cfg.data.val_size = FIXTURE_TRAIN
    with pytest.raises(PipelineError, match="data.val_size=600"):
        normalise(fixture_cfg.data, raw_dir(fixture_cfg), tmp_path / "processed")
    assert not (tmp_path / "processed").exists()


def _runs(cfg):
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.MlflowClient().get_experiment_by_name(cfg.mlflow.experiment)
    return mlflow.MlflowClient().search_runs([experiment.experiment_id])


def test_train_learns_logs_and_is_deterministic(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, tmp_path / "models")
    ((W, b),), config = model_file.load(tmp_path / "models" / model_file.FILE)
    assert W.shape == (10, 784) and b.shape == (10,) and W.dtype == np.float32
    assert config["train"] == OmegaConf.to_container(fixture_cfg.train)
    with open(tmp_path / "models" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    assert float(history[-1]["val_accuracy"]) > 0.9  # the bars are easy to learn

    (run,) = _runs(fixture_cfg)
    assert json.loads((tmp_path / "models" / "run.json").read_text())["run_id"] == run.info.run_id
    assert run.data.params["train.lr"] == "0.1" and run.data.params["train.batch_size"] == "32"
    assert run.info.run_name == "softmax lr=0.1 epochs=3 batch_size=32"  # what differs from the defaults
    assert not [key for key in run.data.params if key.startswith(("data.files", "data.sources", "paths."))]
    assert run.data.params["data.name"] == fixture_cfg.data.name
    assert run.data.params["data.digest"] == runs.dataset_digest(runs.raw_digests(fixture_cfg))
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}  # the UI's Datasets column
    assert sorted(inputs) == ["mnist-test", "mnist-train", "mnist-val"]
    assert {i.tags[0].value for i in inputs.values()} == {"train", "val", "test"}  # mlflow.data.context
    assert json.loads(inputs["mnist-val"].dataset.schema)["mlflow_colspec"][0]["tensor-spec"]["shape"] == [FIXTURE_VAL, 784]
    assert json.loads(inputs["mnist-test"].dataset.source)["uri"] == str(raw_dir(fixture_cfg).resolve())
    assert len({i.dataset.digest for i in inputs.values()}) == 3
    steps = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in steps] == [1, 2, 3]
    assert steps[-1].value == pytest.approx(float(history[-1]["val_accuracy"]))

    assert run.data.tags["data.name"] == fixture_cfg.data.name
    for key, spec in fixture_cfg.data.files.items():  # from the manifest of the arrays read
        assert run.data.tags[f"data.{key}.sha256"] == spec.sha256

    train.train(fixture_cfg, tmp_path / "again")
    assert (tmp_path / "again" / model_file.FILE).read_bytes() == (
        tmp_path / "models" / model_file.FILE).read_bytes()
    # Settings that change no result (LOCAL_KEYS) leave no trace in the model file.
    fixture_cfg.mlflow.experiment, fixture_cfg.data.timeout_s = "elsewhere", 3.0
    fixture_cfg.data.sources[0].path = str(tmp_path / "another" / "mirror")
    train.train(fixture_cfg, tmp_path / "local-keys")
    assert (tmp_path / "local-keys" / model_file.FILE).read_bytes() == (
        tmp_path / "models" / model_file.FILE).read_bytes()


def test_batch_size_one_is_the_lecture_sgd(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    fixture_cfg.train.batch_size, fixture_cfg.train.epochs, fixture_cfg.train.lr = 1, 1, 0.01
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, tmp_path / "models")
    with open(tmp_path / "models" / "history.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["val_accuracy"]) > 0.9


def test_evaluate_and_export_write_reports_into_the_training_run(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    train.train(fixture_cfg, tmp_path / "run")  # ad hoc: evaluates and exports in the same run
    metrics = json.loads((tmp_path / "run" / evaluation.METRICS_FILE).read_text())["test"]
    assert 0.9 < metrics["accuracy"] <= 1.0
    assert sorted(metrics) == ["accuracy", "loss"]  # `dvc metrics show` stays narrow
    per_class = json.loads((tmp_path / "run" / evaluation.PER_CLASS_FILE).read_text())["test"]
    assert sorted(per_class) == ["precision", "recall"]
    assert sorted(per_class["precision"]) == sorted(per_class["recall"]) == [str(k) for k in range(10)]
    with open(tmp_path / "run" / evaluation.PREDICTIONS_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == FIXTURE_TEST
    hits = sum(row["actual"] == row["predicted"] for row in rows)
    assert hits / FIXTURE_TEST == pytest.approx(metrics["accuracy"], abs=1e-6)

    from PIL import Image
    exported = tmp_path / "run" / "filters"
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [f"filter_{k}_{k}.png" for k in range(10)] + [filters.GRID_FILE])
    assert Image.open(exported / "filter_3_3.png").size == (28 * 8, 28 * 8)

    (run,) = _runs(fixture_cfg)
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "filters")}
    assert "filters/filters.png" in artifacts and "filters/filter_9_9.png" in artifacts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json", "evaluation/per_class.json",
            "evaluation/misclassified.png"} <= logged
    assert Image.open(exported / filters.GRID_FILE).info["dpi"][0] >= 150
    confusion = json.loads(open(client.download_artifacts(
        run.info.run_id, "evaluation/confusion_matrix.json", str(tmp_path))).read())
    assert np.sum(confusion["rows_actual_cols_predicted"]) == FIXTURE_TEST


def test_mlp_trains_and_exports_its_first_64_units(fixture_overrides, tmp_path):
    cfg = make_cfg(*fixture_overrides, "model=mlp", "model.hidden=[80,20]", "train.momentum=0.9")
    _prepare(cfg)
    train.train(cfg, tmp_path / "run")
    layers, config = model_file.load(tmp_path / "run" / model_file.FILE)
    assert [W.shape for W, _ in layers] == [(80, 784), (20, 80), (10, 20)]
    assert config["model"] == {"name": "mlp", "hidden": [80, 20]}
    metrics = json.loads((tmp_path / "run" / evaluation.METRICS_FILE).read_text())["test"]
    assert metrics["accuracy"] > 0.9
    pngs = sorted(p.name for p in (tmp_path / "run" / "filters").iterdir())
    assert len(pngs) == 64 + 1 and "unit_63.png" in pngs and filters.GRID_FILE in pngs


def test_a_run_missing_from_the_store_is_continued_in_a_tagged_new_run(fixture_cfg, tmp_path, monkeypatch):
    """DVC restored models/ on another machine: its run id is not in this store."""
    _prepare(fixture_cfg)
    manifest = read_manifest(fixture_cfg.paths.processed, fixture_cfg.data)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / runs.RUN_FILE).write_text('{"run_id": "0123456789abcdef"}')
    monkeypatch.setenv("DVC_STAGE", "evaluate")  # what DVC runs: the restored run is continued
    with runs.reopened_run(fixture_cfg, manifest, tmp_path / "models", trained_with(fixture_cfg), "evaluate"):
        mlflow.log_metric("test/accuracy", 0.5)
    with runs.reopened_run(fixture_cfg, None, tmp_path / "models", trained_with(fixture_cfg), "export_filters"):
        mlflow.log_metric("filters/exported", 1)
    (run,) = _runs(fixture_cfg)
    assert run.data.metrics["filters/exported"] == 1
    assert run.info.status == "FINISHED" and run.data.tags["restored_from_run_id"] == "0123456789abcdef"
    assert run.data.params["train.lr"] == "0.1" and run.data.metrics["test/accuracy"] == 0.5
    assert run.data.tags["data.name"] == fixture_cfg.data.name
    assert run.data.tags["data.test_images.sha256"] == fixture_cfg.data.files.test_images.sha256


# --- processed data made from something else than the config says --------------

OTHER_SHA256 = "0" * 64
CLASS_LETTERS = list("abcdefghij")
# name: (override, the manifest's value as the message shows it, the config's value as the message shows it)
MISMATCHES = {
    "dataset": ("data.name=fashion", lambda cfg: repr(cfg.data.name), lambda cfg: "'fashion'"),
    "checksums": (f"data.files.train_images.sha256={OTHER_SHA256}",
                  lambda cfg: cfg.data.files.train_images.sha256, lambda cfg: OTHER_SHA256),
    "class names": (f"data.class_names=[{','.join(CLASS_LETTERS)}]",
                    lambda cfg: repr(list(cfg.data.class_names)), lambda cfg: repr(CLASS_LETTERS)),
}
MANIFEST_KEYS = {"dataset": "dataset", "checksums": "raw_sha256", "class names": "class_names"}


def _assert_names_both(message, fixture_cfg, mismatch):
    """One line for the key that differs, with the manifest's value first and then the config's."""
    _, made_with, config_says = MISMATCHES[mismatch]
    (line,) = [line for line in message.splitlines() if line.strip().startswith(f"{MANIFEST_KEYS[mismatch]}:")]
    made, _, says = line.partition("the config says")
    assert made_with(fixture_cfg) in made and config_says(fixture_cfg) in says, line
    assert config_says(fixture_cfg) not in made  # the one value that differs, not both dicts alike
    assert str(fixture_cfg.paths.processed) in message and "dvc repro" in message  # where, and how to fix it


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_train_refuses_processed_data_made_from_something_else(fixture_overrides, fixture_cfg, tmp_path, mismatch):
    _prepare(fixture_cfg)
    cfg = make_cfg(*fixture_overrides, MISMATCHES[mismatch][0])
    with pytest.raises(PipelineError) as info:
        train.train(cfg, tmp_path / "models")
    _assert_names_both(str(info.value), fixture_cfg, mismatch)
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run


def _cli(module, overrides, out):
    return subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={out}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def trained_on_the_fixture(fixture_cfg):
    """The fixture's processed arrays and a model trained on them in paths.model."""
    _prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, fixture_cfg.paths.model)
    return fixture_cfg


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("module", ["pipeline.train", "pipeline.evaluate"])
def test_an_ad_hoc_run_refuses_processed_data_made_from_something_else(
        trained_on_the_fixture, fixture_overrides, tmp_path, module, mismatch):
    fixture_cfg = trained_on_the_fixture
    done = _cli(module, [*fixture_overrides, MISMATCHES[mismatch][0]], tmp_path / "out")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_names_both(done.stderr, fixture_cfg, mismatch)
    assert "Traceback" not in done.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".npz", ".json", ".csv", ".png")]
    (run,) = _runs(fixture_cfg)  # only the training of the fixture: no run for the refused one
    assert "test/accuracy" not in run.data.metrics


def test_evaluate_with_the_matching_data_writes_its_reports(trained_on_the_fixture, fixture_overrides, tmp_path):
    """The counterpart of the refusals above: the same CLI run with the config the arrays were made with."""
    done = _cli("pipeline.evaluate", fixture_overrides, tmp_path / "out")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / evaluation.METRICS_FILE).read_text())["test"]
    (run,) = _runs(trained_on_the_fixture)  # logged into the training's run
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
