"""MLflow: runs, per-epoch metrics, sweeps and the served model. The only
package that imports mlflow.

Importing any of its modules sets MLflow's environment defaults below first;
set one of these variables yourself to override it."""

import logging
import os

for _name, _value in (
    # A tracking server that is down must fail a run within seconds, not after MLflow's
    # default retries (minutes).
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
    # No "Downloading artifacts" progress bars in the logs of stages, sweeps and servers.
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
):
    os.environ.setdefault(_name, _value)

# MLflow's SQLAlchemy store logs every database error with its traceback before raising it;
# the stages say what failed and what to do (pipeline.tracking.store), once.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
