"""Data and models shared through a DVC remote, and DVC's run cache.

A reproduced copy of the repository (the config-flow baseline: two small
synthetic datasets in IDX format) pushes to a directory remote; a second fresh
clone pulls and is up to date without fetching or training, and its evaluate
and export stages, run again by hand, give the same metrics and images.
Returning conf/ to a state already trained restores train's outputs from the
run cache, locally and through the remote.
"""

import hashlib

from conftest import dvc_env, edit, run_ok, stages_run


def _use_remote(repo, env, remote):
    """Point the project's default remote at `remote` for this clone only (.dvc/config.local)."""
    run_ok(["dvc", "remote", "modify", "--local", "storage", "url", str(remote)], repo, env)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clone(source, target, env, remote):
    run_ok(["git", "clone", "-q", str(source), str(target)], source.parent, env)
    _use_remote(target, env, remote)
    return target


def test_push_then_a_fresh_clone_pulls_and_is_up_to_date(dvc_work, tmp_path):
    repo, env = dvc_work
    remote = tmp_path / "remote"
    _use_remote(repo, env, remote)
    run_ok(["dvc", "push"], repo, env)
    clone = _clone(repo, tmp_path / "clone", dvc_env(tmp_path / "store2"), remote)
    (tmp_path / "store2").mkdir()
    env2 = dvc_env(tmp_path / "store2")  # a second machine: its own, empty MLflow store
    assert not (clone / "models/model.npz").exists()
    run_ok(["dvc", "pull"], clone, env2)
    for path in ("data/processed/train_x.npy", "models/model.npz", "models/history.csv", "filters/filters.png"):
        assert _sha(clone / path) == _sha(repo / path), path
    assert "Data and pipelines are up to date" in run_ok(["dvc", "repro"], clone, env2)

    # evaluate and export_filters run again by hand reproduce the committed metrics and images
    run_ok(["python", "-m", "pipeline.evaluate", f"hydra.run.dir={tmp_path / 'eval'}"], clone, env2)
    assert (tmp_path / "eval/metrics.json").read_text() == (repo / "reports/metrics.json").read_text()
    assert _sha(tmp_path / "eval/confusion_matrix.png") == _sha(repo / "reports/confusion_matrix.png")
    run_ok(["python", "-m", "pipeline.export_filters", f"hydra.run.dir={tmp_path / 'filters'}"], clone, env2)
    for png in (repo / "filters").glob("*.png"):
        assert _sha(tmp_path / "filters" / png.name) == _sha(png), png.name


def test_a_config_already_trained_is_restored_from_the_run_cache(dvc_work, tmp_path):
    repo, env = dvc_work
    remote = tmp_path / "remote"
    _use_remote(repo, env, remote)
    run_ok(["dvc", "push", "--run-cache"], repo, env)  # lr 0.2, the baseline
    trained = _sha(repo / "models/model.npz")
    edit(repo / "conf/train/sgd.yaml", r"^lr: .*$", "lr: 0.05")
    assert "train" in stages_run(run_ok(["dvc", "repro"], repo, env))
    run_ok(["dvc", "push", "--run-cache"], repo, env)  # after each repro, as on a shared remote
    at_005 = _sha(repo / "models/model.npz")
    edit(repo / "conf/train/sgd.yaml", r"^lr: .*$", "lr: 0.2")
    out = run_ok(["dvc", "repro"], repo, env)
    assert "train" not in stages_run(out) and "Stage 'train' is cached - skipping run" in out, out
    assert _sha(repo / "models/model.npz") == trained

    # A fresh clone that never trained lr 0.05 restores it through the remote:
    # the run cache says which outputs, `dvc repro --pull` fetches them.
    (tmp_path / "store2").mkdir()
    env2 = dvc_env(tmp_path / "store2")
    clone = _clone(repo, tmp_path / "clone", env2, remote)
    run_ok(["dvc", "pull", "--run-cache"], clone, env2)
    edit(clone / "conf/train/sgd.yaml", r"^lr: .*$", "lr: 0.05")
    out = run_ok(["dvc", "repro", "--pull"], clone, env2)
    assert "train" not in stages_run(out) and "Stage 'train' is cached - skipping run" in out, out
    assert _sha(clone / "models/model.npz") == at_005
