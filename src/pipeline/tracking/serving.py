"""The trained model as an MLflow pyfunc model, servable without a GPU, and the
Model Registry.

Logged as a "model from code" (pipeline/tracking/pyfunc_model.py) plus the NumPy
weights file, so nothing is pickled. Its name says what it is,
<data.name>-<model.name> (e.g. mnist-softmax); the run's tag `model.uri` holds
its models:/ URI:

    mlflow models serve -m runs:/<run_id>/mnist-softmax --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.0, ... 784 pixel values in [0, 1] ...]]}'

A sweep with mlflow.register=<name> registers its best job's model as the next
version of <name> and points the alias `best` at it: serve models:/<name>@best.
"""

import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.data import model_file

MODEL_URI_TAG = "model.uri"
ALIAS = "best"
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 784))]),
                           outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))


def model_name(trained_with):
    """The logged model's name from the config it was trained with: e.g. 'mnist-softmax'."""
    return f"{trained_with['data']['name']}-{trained_with['model']['name']}"


def log_model(weights_path):
    """Log the pyfunc model into the active run, named by model_name; returns its models:/ URI."""
    _, trained_with = model_file.load(weights_path)
    with warnings.catch_warnings():  # MLflow nags for an input example; the signature is explicit
        warnings.simplefilter("ignore", UserWarning)
        info = _log(weights_path, model_name(trained_with))
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def _log(weights_path, name):
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"weights": str(weights_path)},
        signature=SIGNATURE,
        pip_requirements=[f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
    )


def register(model_uri, name, run_id, alias=ALIAS):
    """Register model_uri as the next version of the registered model `name` (created if
    new) and point `alias` at it. Returns the version number."""
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="MNIST-style digit classifier (pipeline.tracking)")
    version = client.create_model_version(name, model_uri, run_id=run_id,
                                          model_id=model_uri.removeprefix("models:/")
                                          if model_uri.startswith("models:/m-") else None)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
