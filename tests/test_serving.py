"""The logged pyfunc model: loaded back and predicting, and served over HTTP on 127.0.0.1,
from its run and from the Model Registry (models:/<name>@best)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings

import mlflow
import numpy as np
import pytest

from conftest import free_port, prepare
from pipeline import train
from pipeline.core import model
from pipeline.data import model_file
from pipeline.data.splits import load_split
from pipeline.tracking import serving


@pytest.fixture
def trained(fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, tmp_path / "run")
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    test_x, test_y = load_split(fixture_cfg.paths.processed, "test")
    layers, _ = model_file.load(tmp_path / "run" / model_file.FILE)
    expected = np.argmax(model.forward(np, layers, test_x)[1], axis=0)
    return run_id, test_x, test_y, expected


def test_pyfunc_round_trip(trained):
    run_id, test_x, test_y, expected = trained
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/mnist-softmax")  # <data.name>-<model.name>
        predicted = loaded.predict(test_x)
    assert not [w for w in caught if "type hint" in str(w.message).lower()]  # predict has them
    assert predicted.dtype == np.int64 and predicted.shape == (len(test_x),)
    np.testing.assert_array_equal(predicted, expected)
    assert (predicted == test_y).mean() > 0.9


@contextlib.contextmanager
def _served(model_uri, log):
    """`mlflow models serve` of model_uri on a free port of 127.0.0.1, up and answering /ping:
    yields a function that posts pixel rows to /invocations and returns the predictions."""
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"))

    def predict(rows):
        body = json.dumps({"inputs": rows.tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        yield predict
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_models_serve_answers_predictions(trained, tmp_path):
    run_id, test_x, _, expected = trained
    with _served(f"runs:/{run_id}/mnist-softmax", tmp_path / "serve.log") as predict:
        assert predict(test_x[:5]) == expected[:5].tolist()
    assert "Add type hints" not in (tmp_path / "serve.log").read_text()


def test_registered_model_served_by_its_alias(trained, tmp_path):
    """What a sweep with mlflow.register=<name> does for its best job (tests/test_sweeps.py
    checks that it does): a new version of <name>, the alias `best` on it, servable."""
    run_id, test_x, _, expected = trained
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    model_uri = client.get_run(run_id).data.tags[serving.MODEL_URI_TAG]
    assert serving.register(model_uri, "digits", run_id) == "1"
    assert serving.register(model_uri, "digits", run_id) == "2"  # the next version takes the alias
    assert str(client.get_model_version_by_alias("digits", "best").version) == "2"
    with _served("models:/digits@best", tmp_path / "serve.log") as predict:
        assert predict(test_x[:5]) == expected[:5].tolist()
