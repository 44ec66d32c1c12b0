"""The pictures and metrics files people look at, the MLflow images of the
filters per epoch, the quiet console (progress bar, one line per failed
source) and the --help of every stage."""

import json
import logging
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import free_port, synthetic_digits
from conftest import prepare as _prepare
from pipeline import train
from pipeline.config import PROJECT_ROOT, ExportConfig, hyperparams
from pipeline.core import backend, metrics, model
from pipeline.core.trainer import fit
from pipeline.data import model_file
from pipeline.data.sources import http_failure, npm_failure
from pipeline.data.splits import load_split
from pipeline.report import evaluation, filters
from pipeline.tracking.images import EpochImages
from pipeline.tracking.runs import tracking_uri

EXPORT = ExportConfig()  # the defaults conf/config.yaml repeats


def _white_row_fraction(path):
    """Share of the picture's pixel rows that are blank: the measure of empty bands."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return float(np.mean((rgb > 250).all(axis=(1, 2))))


@pytest.fixture(scope="module")
def report():
    """A model that gets some of 200 synthetic test images wrong, and its report."""
    rng = np.random.default_rng(5)
    images, labels = synthetic_digits(rng, 200)
    x = images.reshape(200, 784).astype(np.float32) / 255
    W = np.zeros((10, 784), np.float32)
    for k in range(10):  # the bar of class k, except for 8 and 9: they are never predicted right
        W[k].reshape(28, 28)[2 * k + 4: 2 * k + 6, 4:24] = 0.05 if k < 8 else 0.0
    layers = [(W, np.zeros(10, np.float32))]
    return metrics.evaluate(backend.select("numpy"), layers, x, labels, 10), x, labels


def test_metrics_json_holds_loss_and_accuracy_and_per_class_json_the_rest(report, tmp_path):
    rep, x, _ = report
    names = [f"c{k}" for k in range(10)]
    paths = evaluation.write_reports(rep, names, tmp_path, x)
    assert [p.name for p in paths] == ["metrics.json", "per_class.json", "confusion.csv", "confusion_matrix.png",
                                       "misclassified.png"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "test": {"loss": round(rep["loss"], 6), "accuracy": round(rep["accuracy"], 6)}}
    per_class = json.loads((tmp_path / "per_class.json").read_text())["test"]
    assert list(per_class["recall"]) == names
    assert per_class["recall"]["c9"] == 0.0 and per_class["recall"]["c0"] == 1.0
    assert per_class["precision"]["c3"] == pytest.approx(float(rep["precision"][3]), abs=1e-6)
    # Without the images (what an older caller passes) there is no gallery, the rest is the same.
    assert [p.name for p in evaluation.write_reports(rep, names, tmp_path / "plain")][-1] == "confusion_matrix.png"


def test_the_confusion_matrix_shows_counts_and_rows_side_by_side(report, tmp_path):
    rep, x, _ = report
    evaluation.write_reports(rep, [str(k) for k in range(10)], tmp_path, x)
    picture = Image.open(tmp_path / evaluation.CONFUSION_PNG)
    assert picture.info["dpi"][0] >= 150
    width, height = picture.size
    assert width > 1.7 * height and height >= 700  # two square panels, readable annotations
    assert _white_row_fraction(tmp_path / evaluation.CONFUSION_PNG) < 0.1


def test_the_gallery_shows_the_first_25_misclassified_images(report, tmp_path):
    rep, x, labels = report
    wrong = evaluation.misclassified(rep["actual"], rep["predicted"])
    expected = np.flatnonzero(rep["actual"] != rep["predicted"])
    assert len(expected) > 25 and list(wrong) == list(expected[:25])
    assert all(labels[k] != rep["predicted"][k] for k in wrong)
    evaluation.write_reports(rep, [str(k) for k in range(10)], tmp_path, x)
    picture = Image.open(tmp_path / evaluation.MISCLASSIFIED_PNG)
    assert picture.info["dpi"][0] >= 150
    width, height = picture.size  # 5 x 5 cells of a 28x28 image each, at least 5 px a pixel
    assert width >= 5 * 28 * 5 and 0.9 < height / width < 1.4


def test_each_filter_has_its_own_symmetric_scale(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(10, 784)).astype(np.float32)
    W[3] *= 100  # one filter 100 times larger: under a shared scale the others would be blank
    W[7, 5] = 1e4  # one extreme pixel: clipped, not the limit of its filter
    found = filters.limits(W.reshape(10, 28, 28), EXPORT.clip_percentile)
    assert found[3] == pytest.approx(100 * found[0], rel=0.3)
    assert found[7] < 10  # the 99.5th percentile, not the outlier
    assert filters.limits(np.zeros((1, 28, 28)), 99.5)[0] == 1.0  # an all-zero filter still draws

    paths = filters.export_filters(W, [str(k) for k in range(10)], [f"f{k}" for k in range(10)], tmp_path, EXPORT)
    grid = Image.open(tmp_path / filters.GRID_FILE)
    assert paths[-1].name == filters.GRID_FILE and grid.info["dpi"][0] >= 150
    # 2 rows x 5 columns of square cells, tight: wider than high, no empty band of rows.
    assert 1.6 < grid.size[0] / grid.size[1] < 2.6 and grid.size[0] >= 1400
    assert _white_row_fraction(tmp_path / filters.GRID_FILE) < 0.12
    # The per-filter PNGs: the big filter looks like a small one, not saturated.
    big, small = (np.asarray(Image.open(tmp_path / f"f{k}.png").convert("RGB")) for k in (3, 0))
    assert big.shape == (224, 224, 3) and abs(big.std() - small.std()) < 0.25 * small.std()


def test_the_mlflow_snapshot_is_the_grid_as_an_rgb_array():
    W = np.random.default_rng(1).normal(size=(10, 784)).astype(np.float32)
    layers = [(W, np.zeros(10, np.float32))]
    image = filters.live_grid_image(layers, [str(k) for k in range(10)], EXPORT, np.asarray, "epoch 5 of 20")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] >= 1400 and 1.6 < image.shape[1] / image.shape[0] < 2.6


@pytest.mark.parametrize("every, last, due", [(5, 12, [5, 10, 12]), (5, 10, [5, 10]), (1, 3, [1, 2, 3]),
                                              (0, 12, []), (20, 3, [3])])
def test_snapshot_epochs(every, last, due):
    rendered, logged = [], []
    snapshots = EpochImages("filters", every, last, lambda epoch: rendered.append(epoch) or f"image {epoch}",
                            lambda image, key, step: logged.append((image, key, step)))
    for epoch in range(1, last + 1):
        snapshots(epoch, {})
    assert rendered == due  # the layers are drawn (copied to the host) on those epochs only
    assert logged == [(f"image {epoch}", "filters", epoch) for epoch in due]


def test_training_logs_the_filters_to_mlflow_every_few_epochs(fixture_cfg, tmp_path):
    _prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train, fixture_cfg.train.epochs, fixture_cfg.export.log_every_epochs = False, 5, 2
    train.train(fixture_cfg, tmp_path / "models")
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(fixture_cfg.mlflow.experiment).experiment_id])
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    full = sorted((int(p.split("+step+")[1].split("+")[0]), p) for p in logged if p.endswith(".png"))
    assert [step for step, _ in full] == [2, 4, 5]  # every 2 epochs and the last
    assert all(p.startswith("images/filters+step+") for _, p in full)
    assert sum(p.endswith("+compressed.webp") for p in logged) == 3  # the thumbnails the UI's slider shows
    last = Image.open(client.download_artifacts(run.info.run_id, full[-1][1], str(tmp_path)))
    assert last.mode == "RGB" and last.size[0] >= 1400 and 1.6 < last.size[0] / last.size[1] < 2.6
    # The last snapshot is the trained model's grid.
    (layers, _) = model_file.load(tmp_path / "models" / model_file.FILE)
    expected = filters.live_grid_image(layers, list(fixture_cfg.data.class_names), fixture_cfg.export,
                                       np.asarray, "epoch 5 of 5")
    assert np.abs(np.asarray(last).astype(int) - expected.astype(int)).mean() < 2


def test_progress_bar_at_a_terminal_plain_lines_elsewhere(fixture_cfg, caplog, capsys):
    _prepare(fixture_cfg)
    hp = hyperparams(fixture_cfg)
    be = backend.select("numpy")
    data = [load_split(fixture_cfg.paths.processed, split) for split in ("train", "val")]
    for progress in (True, False):
        layers = model.init_params(np.random.default_rng(0), [784, 10])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.core.trainer"):
            fit(be, hp, np.random.default_rng(0), layers, *data, 10, progress=progress)
        epoch_lines = [r for r in caplog.records if r.getMessage().startswith("epoch ")]
        err = capsys.readouterr().err
        if progress:
            assert epoch_lines == [] and "training: 100%" in err and "3/3" in err and "val loss" in err
        else:
            assert len(epoch_lines) == 3 and "training" not in err


def test_a_failed_download_is_one_line(fixture_cfg):
    import requests

    url = f"http://127.0.0.1:{free_port()}/mnist/x.gz"
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(url, timeout=5)
    line = http_failure(info.value, 5)
    assert line == "connection refused to 127.0.0.1"
    assert http_failure(requests.ReadTimeout("HTTPSConnectionPool(...): Read timed out."), 30) == (
        "no answer within 30 s (data.timeout_s)")
    stderr = ("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/nope\nnpm error 404\n"
              "npm error 404  'nope@1.0.0' is not in this registry.\n"
              "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    assert npm_failure(stderr) == "[E404] 404 Not Found - GET https://registry.npmjs.org/nope"


def test_dvc_yaml_declares_the_evaluation_files():
    evaluate = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    metric_files = {name: spec for entry in evaluate["metrics"] for name, spec in entry.items()}
    # One metrics file of two numbers: `dvc metrics show` stays one short row.
    assert metric_files == {f"reports/{evaluation.METRICS_FILE}": {"cache": False}}
    outs = {entry if isinstance(entry, str) else next(iter(entry)) for entry in evaluate["outs"]}
    assert outs == {f"reports/{name}" for name in (evaluation.PER_CLASS_FILE, evaluation.PREDICTIONS_FILE,
                                                   evaluation.CONFUSION_PNG, evaluation.MISCLASSIFIED_PNG)}


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_help_is_short_and_names_the_groups(stage):
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert len(text.splitlines()) < 60
    assert text.startswith(f"{stage}: ")
    for group in ("data", "model", "train", "backend", "experiment"):
        assert f"\n{group}: " in text, group
    assert "mnist" in text and "mlp" in text and "train.lr=" in text and "export.log_every_epochs=" in text
    assert "sha256" not in text and "http" not in text.replace("https://hydra.cc", "")
