"""Wall time of a 5-learning-rate sweep, run serially against joblib with n_jobs=2.

    dvc repro normalise              # the real MNIST in data/processed/
    python benchmarks/bench_sweep.py [--epochs 5]

Each sweep is the real CLI (`python -m pipeline.train -m ...`): training,
evaluation, filter export and MLflow logging for every job, into a throwaway
MLflow store and sweep directory.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = "0.001,0.01,0.1,0.5,1.0"


def sweep(tmp, name, epochs, *launcher):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/{name}.db")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.train", "-m", f"train.lr={LRS}", f"train.epochs={epochs}",
                    *launcher, f"hydra.sweep.dir={tmp}/{name}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"5 jobs (train.lr={LRS}), {args.epochs} epochs each, {os.cpu_count()} cores, "
              f"load average before {os.getloadavg()[0]:.2f}")
        serial = sweep(tmp, "serial", args.epochs)
        parallel = sweep(tmp, "joblib", args.epochs, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    print(f"serial (basic launcher): {serial:6.1f} s")
    print(f"joblib, n_jobs=2:        {parallel:6.1f} s   ({serial / parallel:.2f}x faster)")


if __name__ == "__main__":
    main()
