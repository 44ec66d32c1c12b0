"""The trained model as an MLflow pyfunc model, servable without a GPU.

Logged as a "model from code" (pipeline/tracking/pyfunc_model.py) plus the NumPy
weights file, so nothing is pickled:

    mlflow models serve -m runs:/<run_id>/model --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.0, ... 784 pixel values in [0, 1] ...]]}'
"""

import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

ARTIFACT_PATH = "model"
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 784))]),
                           outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))


def log_model(weights_path):
    """Log the pyfunc model into the active run under `model/`."""
    with warnings.catch_warnings():  # MLflow nags for type hints and an input example; the signature is explicit
        warnings.simplefilter("ignore", UserWarning)
        _log(weights_path)


def _log(weights_path):
    mlflow.pyfunc.log_model(
        name=ARTIFACT_PATH,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"weights": str(weights_path)},
        signature=SIGNATURE,
        pip_requirements=[f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
    )
