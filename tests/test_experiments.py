"""The named configs of conf/experiment/ reach their accuracy bars on the real
test set, as logged to MLflow by an ad hoc `python -m pipeline.train`."""

import os
import subprocess
import sys

import mlflow
import pytest

from conftest import make_cfg
from pipeline.config import PROJECT_ROOT
from pipeline.normalise import normalise


@pytest.fixture(scope="module")
def processed(real_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("processed")
    normalise(make_cfg().data, real_mnist, out)
    return out


@pytest.mark.parametrize("experiment, bar", [("softmax", 0.925), ("mlp", 0.980)])
def test_named_experiment_reaches_its_bar(processed, tmp_path, experiment, bar):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", f"experiment={experiment}", f"paths.processed={processed}",
         "mlflow.experiment=bars", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=PROJECT_ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri),
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("bars").experiment_id])
    assert run.data.params["model.name"] == experiment
    assert run.data.tags["data.name"] == "mnist"  # from the manifest of the arrays trained on
    assert run.data.metrics["test/accuracy"] >= bar
