"""Each stage on the small synthetic fixture in real IDX format."""

import csv
import json

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import FIXTURE_TEST, FIXTURE_TRAIN, FIXTURE_VAL
from pipeline import evaluate, export_filters, model, train
from pipeline.config import SourceSpec
from pipeline.errors import PipelineError
from pipeline.fetch import fetch
from pipeline.data.files import sha256_of
from pipeline.normalise import load_split, normalise
from pipeline.tracking import tracking_uri


def _prepare(cfg):
    fetch(cfg.data, cfg.paths.raw)
    normalise(cfg.data, cfg.paths.raw, cfg.paths.processed)


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
    raw = read_images(tmp_path / "raw" / fixture_cfg.data.files.train_images.name)
    np.testing.assert_array_equal(val_x, raw[-FIXTURE_VAL:].reshape(FIXTURE_VAL, 784) / np.float32(255))
    first = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
    normalise(fixture_cfg.data, fixture_cfg.paths.raw, tmp_path / "again")
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()} == first


def test_normalise_refuses_a_validation_set_as_big_as_the_training_set(fixture_cfg, tmp_path):
    fetch(fixture_cfg.data, fixture_cfg.paths.raw)
    fixture_cfg.data.val_size = FIXTURE_TRAIN
    with pytest.raises(PipelineError, match="data.val_size=600"):
        normalise(fixture_cfg.data, fixture_cfg.paths.raw, tmp_path / "processed")
    assert not (tmp_path / "processed").exists()


def _runs(cfg):
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.MlflowClient().get_experiment_by_name(cfg.mlflow.experiment)
    return mlflow.MlflowClient().search_runs([experiment.experiment_id])


def test_train_learns_logs_and_is_deterministic(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, tmp_path / "models")
    ((W, b),), config = model.load(tmp_path / "models" / model.FILE)
    assert W.shape == (10, 784) and b.shape == (10,) and W.dtype == np.float32
    assert config["train"] == OmegaConf.to_container(fixture_cfg.train)
    with open(tmp_path / "models" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    assert float(history[-1]["val_accuracy"]) > 0.9  # the bars are easy to learn

    (run,) = _runs(fixture_cfg)
    assert json.loads((tmp_path / "models" / "run.json").read_text())["run_id"] == run.info.run_id
    assert run.data.params["train.lr"] == "0.1" and run.data.params["train.batch_size"] == "32"
    steps = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in steps] == [1, 2, 3]
    assert steps[-1].value == pytest.approx(float(history[-1]["val_accuracy"]))

    train.train(fixture_cfg, tmp_path / "again")
    assert (tmp_path / "again" / model.FILE).read_bytes() == (tmp_path / "models" / model.FILE).read_bytes()


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
    metrics = json.loads((tmp_path / "run" / evaluate.METRICS_FILE).read_text())["test"]
    assert 0.9 < metrics["accuracy"] <= 1.0
    assert sorted(metrics["precision"]) == [str(k) for k in range(10)]
    with open(tmp_path / "run" / evaluate.PREDICTIONS_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == FIXTURE_TEST
    hits = sum(row["actual"] == row["predicted"] for row in rows)
    assert hits / FIXTURE_TEST == pytest.approx(metrics["accuracy"], abs=1e-6)

    from PIL import Image
    filters = tmp_path / "run" / "filters"
    assert sorted(p.name for p in filters.iterdir()) == sorted(
        [f"filter_{k}.png" for k in range(10)] + [export_filters.GRID_FILE])
    assert Image.open(filters / "filter_3.png").size == (28 * 8, 28 * 8)

    (run,) = _runs(fixture_cfg)
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "filters")}
    assert "filters/filters.png" in artifacts and "filters/filter_9.png" in artifacts
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json"} <= evaluation
    confusion = json.loads(open(client.download_artifacts(
        run.info.run_id, "evaluation/confusion_matrix.json", str(tmp_path))).read())
    assert np.sum(confusion["rows_actual_cols_predicted"]) == FIXTURE_TEST


def test_mlp_trains_and_exports_its_first_64_units(fixture_overrides, tmp_path):
    from conftest import make_cfg
    cfg = make_cfg(*fixture_overrides, "model=mlp", "model.hidden=[80,20]", "train.momentum=0.9")
    _prepare(cfg)
    train.train(cfg, tmp_path / "run")
    layers, config = model.load(tmp_path / "run" / model.FILE)
    assert [W.shape for W, _ in layers] == [(80, 784), (20, 80), (10, 20)]
    assert config["model"] == {"name": "mlp", "hidden": [80, 20]}
    metrics = json.loads((tmp_path / "run" / evaluate.METRICS_FILE).read_text())["test"]
    assert metrics["accuracy"] > 0.9
    pngs = sorted(p.name for p in (tmp_path / "run" / "filters").iterdir())
    assert len(pngs) == 64 + 1 and "filter_63.png" in pngs and export_filters.GRID_FILE in pngs


def test_a_run_missing_from_the_store_is_continued_in_a_tagged_new_run(fixture_cfg, tmp_path):
    """DVC restored models/ on another machine: its run id is not in this store."""
    from pipeline import tracking
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / tracking.RUN_FILE).write_text('{"run_id": "0123456789abcdef"}')
    with tracking.reopened_run(fixture_cfg, tmp_path / "models"):
        mlflow.log_metric("test/accuracy", 0.5)
    (run,) = _runs(fixture_cfg)
    assert run.info.status == "FINISHED" and run.data.tags["restored_from_run_id"] == "0123456789abcdef"
    assert run.data.params["train.lr"] == "0.1" and run.data.metrics["test/accuracy"] == 0.5
