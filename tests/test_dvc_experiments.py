"""`dvc exp run -S` on our conf/ layout: a single value and a --queue grid,
shown by `dvc exp show` with the lr and test-accuracy columns."""

import json

import mlflow

from conftest import run_ok

LR = "conf/train/sgd.yaml:lr"  # -S edits conf/; the stages read the values from params/resolved.yaml
PARAMS = "params/resolved.yaml"


def _experiments(repo, env):
    """{experiment name: (lr, test accuracy)} from `dvc exp show --json`, baseline excluded."""
    found = {}
    for commit in json.loads(run_ok(["dvc", "exp", "show", "--json"], repo, env)):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get(PARAMS, {}).get("data", {})
                metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
                found[rev["name"]] = (params.get("train", {}).get("lr"), metrics.get("test", {}).get("accuracy"))
    return found


def test_dvc_exp_run_single_value_and_queued_grid(repo_copy):
    """The queued runs go first, on a fresh store at the project root: they run in DVC's
    temporary copies, which must not become the experiment's artifact location."""
    repo, env = repo_copy
    env = {key: value for key, value in env.items() if key != "MLFLOW_TRACKING_URI"}  # the project's own store
    run_ok(["dvc", "exp", "run", "--queue", "-S", f"{LR}=0.01,0.3"], repo, env)
    run_ok(["dvc", "exp", "run", "--run-all", "--jobs", "2"], repo, env, timeout=900)
    run_ok(["dvc", "exp", "run", "-n", "single", "-S", f"{LR}=0.5"], repo, env)
    table = run_ok(["dvc", "exp", "show", "--csv"], repo, env)
    header = table.splitlines()[0]
    assert "lr" in header and "test.accuracy" in header
    found = _experiments(repo, env)
    assert sorted(lr for lr, _ in found.values()) == [0.01, 0.3, 0.5], found
    assert all(0.80 < accuracy < 0.95 for _, accuracy in found.values())
    assert found["single"][0] == 0.5

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("mnist")
    assert experiment.artifact_location == (repo / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(run.data.params["train.lr"]) for run in runs) == [0.01, 0.3, 0.5]
    for run in runs:  # each run's artifacts are still there after DVC removed its copy
        assert run.info.artifact_uri.startswith((repo / "mlruns").as_uri())
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.info.status == "FINISHED"
