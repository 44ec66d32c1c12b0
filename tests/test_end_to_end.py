"""`dvc repro` in a fresh git + DVC copy of this repository, on the real MNIST.

The copy is what a newcomer clones, with one edit (2 epochs) to keep it short.
Then the MLflow run is read back, and DVC's incremental behaviour is checked.
"""

import json
import sys

import mlflow
import pytest
import yaml

from conftest import run_ok, set_yaml_value, stages_run

STAGES = ["resolve", "fetch", "normalise", "train", "evaluate", "export_filters"]


def test_dvc_repro_end_to_end_on_real_mnist(repo_copy):
    repo, env = repo_copy
    out = run_ok(["dvc", "repro"], repo, env)
    assert stages_run(out) == STAGES

    metrics = json.loads((repo / "reports/metrics.json").read_text())["test"]
    assert 0.88 <= metrics["accuracy"] <= 0.95  # 2 epochs of softmax regression on the real test set
    per_class = json.loads((repo / "reports/per_class.json").read_text())["test"]
    assert sorted(per_class["recall"]) == [str(k) for k in range(10)] and len(per_class["precision"]) == 10
    assert set(metrics) == {"loss", "accuracy"}  # `dvc metrics show` stays narrow
    assert sorted(p.name for p in (repo / "filters").glob("filter_*.png")) == [f"filter_{k}_{k}.png" for k in range(10)]
    assert sorted(p.name for p in (repo / "data/raw").iterdir()) == ["mnist"]  # one directory per dataset
    manifest = json.loads((repo / "data/processed/manifest.json").read_text())
    assert manifest["dataset"] == "mnist" and manifest["raw_sha256"]["train_images"].startswith("ba891046")
    resolved = yaml.safe_load((repo / "params/resolved.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and "paths" not in resolved and "sources" not in resolved["data"]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    assert json.loads((repo / "models/run.json").read_text())["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.2" and params["train.epochs"] == "2" and params["seed"] == "0"
    assert params["model.name"] == "softmax" and params["backend.name"] == "auto"
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert run.data.metrics["test/loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    head = run_ok(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["data.name"] == "mnist"
    assert run.data.tags["data.train_images.sha256"].startswith("ba891046")  # from the manifest
    assert run.data.tags["data.test_labels.sha256"] == manifest["raw_sha256"]["test_labels"]
    artifacts = {a.path for top in ("filters", "evaluation") for a in client.list_artifacts(run.info.run_id, top)}
    assert {"filters/filters.png", "filters/filter_0_0.png", "evaluation/confusion_matrix.png"} <= artifacts

    # Nothing changed: nothing reruns.
    assert "Data and pipelines are up to date" in run_ok(["dvc", "repro"], repo, env)

    # A new learning rate reruns resolve, then train and what follows it, not fetch or normalise.
    set_yaml_value(repo / "conf/train/sgd.yaml", "lr", 0.1)
    assert stages_run(run_ok(["dvc", "repro"], repo, env)) == ["resolve", "train", "evaluate", "export_filters"]
    assert "Data and pipelines are up to date" in run_ok(["dvc", "status"], repo, env)
    # The params DVC tracks are the resolved file's keys: the change shows once resolve has written it.
    diff = run_ok(["dvc", "params", "diff", "--json"], repo, env)
    changed = json.loads(diff)["params/resolved.yaml"]["train.lr"]
    assert (changed["old"], changed["new"]) == (0.2, 0.1)
    assert len(client.search_runs([experiment.experiment_id])) == 2

    # An ad hoc run logs a complete run of its own and leaves DVC's outputs alone.
    run_ok([sys.executable, "-m", "pipeline.train", "train.epochs=1"], repo, env)
    assert "Data and pipelines are up to date" in run_ok(["dvc", "status"], repo, env)
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    assert len(runs) == 3
    adhoc = runs[0]
    assert adhoc.data.params["train.epochs"] == "1" and "test/accuracy" in adhoc.data.metrics
    assert "filters/filters.png" in {a.path for a in client.list_artifacts(adhoc.info.run_id, "filters")}
    assert list((repo / "outputs").glob("*/*/model.npz"))
