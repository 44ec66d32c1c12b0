"""MLflow: runs, per-epoch metrics, sweeps and the served model. The only
package that imports mlflow."""
