"""Where a run came from, read back from MLflow: the commit, whether the tree was
dirty as the user left it (DVC's own rewrites do not count), the DVC experiment,
and system metrics behind one switch."""

import mlflow

from conftest import prepare, run_ok
from pipeline import train
from pipeline.tracking import runs


def _store_runs(env, experiment="mnist"):
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_dvc_repro_of_a_clean_commit_is_not_dirty(dvc_baseline):
    """The baseline's `dvc repro` rewrote params/resolved.yaml and wrote dvc.lock,
    models/, reports/ (DVC's outputs) while the run was open: still clean."""
    repo, store = dvc_baseline
    (run,) = _store_runs({"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    copied = run_ok(["git", "rev-parse", "HEAD~1"], repo, None).strip()  # the commit `dvc repro` ran on
    assert run.data.tags["mlflow.source.git.commit"] == copied
    assert run.data.tags["git.dirty"] == "False"
    assert "dvc.exp_name" not in run.data.tags  # a plain `dvc repro`, no experiment
    assert run.info.run_name == "softmax epochs=2 batch_size=32 data=fixture_a"  # what differs from the defaults


def test_git_dirty_ignores_what_dvc_rewrites_and_sees_the_rest(dvc_work, tmp_path):
    repo, _ = dvc_work
    assert runs.git_dirty(repo) == "False"
    for path in ("dvc.lock", "params/resolved.yaml", "reports/metrics.json", "reports/confusion.csv"):
        (repo / path).write_text((repo / path).read_text() + "\n")  # what DVC does while a stage runs
    (repo / "models/model.npz").unlink()  # DVC deletes a stage's outs before running it
    assert runs.git_dirty(repo) == "False"
    (repo / "scratch.txt").write_text("untracked")
    assert runs.git_dirty(repo) == "False"
    (repo / "README.md").write_text((repo / "README.md").read_text() + "an edit\n")  # the user's change
    assert runs.git_dirty(repo) == "True"
    assert runs.git_dirty(tmp_path / "nowhere") == "unknown"  # not a git repository


def test_dvc_exp_run_tags_the_experiment_name(dvc_work):
    repo, env = dvc_work
    run_ok(["dvc", "exp", "run", "-n", "lr-probe", "-S", "conf/train/sgd.yaml:lr=0.05"], repo, env)
    (run,) = [r for r in _store_runs(env) if r.data.tags.get("dvc.exp_name") == "lr-probe"]
    assert run.data.params["train.lr"] == "0.05"
    assert run.info.run_name == "softmax lr=0.05 epochs=2 batch_size=32 data=fixture_a"
    head = run_ok(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert run.data.tags["dvc.exp_baseline_rev"] == head == run.data.tags["mlflow.source.git.commit"]
    # -S edited conf/train/sgd.yaml before the stages ran: the tree differs from the commit there.
    assert run.data.tags["git.dirty"] == "True"
    assert "test/accuracy" in run.data.metrics  # evaluate reopened the same run


def test_system_metrics_only_when_switched_on(fixture_cfg, tmp_path, monkeypatch):
    import psutil  # noqa: F401  MLflow's system metrics need it (pyproject.toml lists it)

    prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    train.train(fixture_cfg, tmp_path / "off")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # 10 s by default: longer than this run
    fixture_cfg.mlflow.system_metrics = True
    train.train(fixture_cfg, tmp_path / "on")
    mlflow.set_tracking_uri(runs.tracking_uri())
    client = mlflow.MlflowClient()
    off, on = client.search_runs([client.get_experiment_by_name(fixture_cfg.mlflow.experiment).experiment_id],
                                 order_by=["attributes.start_time ASC"])
    assert not [key for key in off.data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in on.data.metrics


def test_a_dataset_insert_lost_to_a_parallel_job_is_retried_and_never_fails_the_training(
        fixture_cfg, tmp_path, monkeypatch):
    """Two jobs of a parallel sweep log the same dataset at once: the store's second insert fails
    (UNIQUE constraint, seen on a tracking server under SLURM); the retry finds the dataset."""
    from mlflow.exceptions import MlflowException

    prepare(fixture_cfg)
    fixture_cfg.evaluate_after_train = False
    real, calls = mlflow.log_inputs, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, datasets.name")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_inputs", racing)
    train.train(fixture_cfg, tmp_path / "raced")
    monkeypatch.setattr(mlflow, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(MlflowException("down")))
    train.train(fixture_cfg, tmp_path / "lost")  # three failures: a warning, the training completes
    client = mlflow.MlflowClient()
    raced, lost = client.search_runs([client.get_experiment_by_name(fixture_cfg.mlflow.experiment).experiment_id],
                                     order_by=["attributes.start_time ASC"])
    assert len(calls) == 2 and len(raced.data.metrics) and raced.info.status == "FINISHED"
    assert sorted(i.dataset.name for i in raced.inputs.dataset_inputs) == ["mnist-test", "mnist-train", "mnist-val"]
    assert lost.info.status == "FINISHED" and not lost.inputs.dataset_inputs
    assert (tmp_path / "lost" / "model.npz").is_file()
