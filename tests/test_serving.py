"""The logged pyfunc model: loaded back and predicting, and served over HTTP on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest

from conftest import free_port, prepare
from pipeline import train
from pipeline.core import model
from pipeline.data import model_file
from pipeline.data.splits import load_split


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
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    predicted = loaded.predict(test_x)
    assert predicted.dtype == np.int64 and predicted.shape == (len(test_x),)
    np.testing.assert_array_equal(predicted, expected)
    assert (predicted == test_y).mean() > 0.9


def test_mlflow_models_serve_answers_predictions(trained, tmp_path):
    run_id, test_x, _, expected = trained
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        body = json.dumps({"inputs": test_x[:5].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert answer["predictions"] == expected[:5].tolist()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
