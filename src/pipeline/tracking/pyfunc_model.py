"""The MLflow "model from code" that serving.log_model logs: predicts digits
from 784 pixel values in [0, 1], with NumPy only."""

import mlflow
import numpy as np
from mlflow.models import set_model

from pipeline.core import model
from pipeline.data import model_file


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.layers, _ = model_file.load(context.artifacts["weights"])

    # Type hints: MLflow warns "Add type hints to the predict method" without them. The
    # signature serving.log_model logs (float32 tensors of shape (-1, 784)) stays the schema.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        X = np.asarray(model_input, dtype=np.float32).reshape(-1, 784)
        _, logits = model.forward(np, self.layers, X)
        return np.argmax(logits, axis=0).astype(np.int64)


set_model(DigitClassifier())
