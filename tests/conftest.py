"""Shared fixtures: composed configs, a small MNIST-shaped fixture in real IDX
format, and the real MNIST fetched once per test session."""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, PROJECT_ROOT, validate
from pipeline.data.idx import encode_idx

FIXTURE_TRAIN, FIXTURE_TEST, FIXTURE_VAL = 600, 200, 100


def make_cfg(*overrides):
    """The config exactly as a stage composes it, with command-line overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


def synthetic_digits(rng, n):
    """Learnable 28x28 uint8 images: class k is a bright bar at rows 2k+4..2k+5, plus noise."""
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4: 2 * k + 6, 4:24] = 255
    return images, labels


@pytest.fixture(scope="session")
def idx_fixture(tmp_path_factory):
    """A directory with the four IDX files of a small synthetic dataset, and their
    file specs ({split key: {name, sha256, size}}) for conf overrides."""
    root = tmp_path_factory.mktemp("idx_fixture")
    rng = np.random.default_rng(123)
    train_x, train_y = synthetic_digits(rng, FIXTURE_TRAIN)
    test_x, test_y = synthetic_digits(rng, FIXTURE_TEST)
    arrays = {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}
    specs = {}
    for key, array in arrays.items():
        name = key.replace("_", "-") + "-fixture-ubyte"
        blob = encode_idx(array)
        (root / name).write_bytes(blob)
        specs[key] = {"name": name, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    return root, specs


@pytest.fixture
def fixture_overrides(idx_fixture, tmp_path, monkeypatch):
    """Command-line overrides for the fixture dataset: local source only, outputs
    and the MLflow store (through MLFLOW_TRACKING_URI) in tmp_path."""
    root, specs = idx_fixture
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = [f"data.val_size={FIXTURE_VAL}", "train.epochs=3", "train.batch_size=32",
                 "train.lr=0.1", f"paths.raw={tmp_path / 'raw'}",
                 f"paths.processed={tmp_path / 'processed'}", f"paths.model={tmp_path / 'models'}",
                 "mlflow.experiment=fixture",
                 f"data.sources=[{{kind: local, path: '{root}'}}]"]
    for key, spec in specs.items():
        overrides += [f"data.files.{key}.{field}={value}" for field, value in spec.items()]
    return overrides


@pytest.fixture
def fixture_cfg(fixture_overrides):
    return make_cfg(*fixture_overrides)


def raw_dir(cfg):
    """Where the fetch stage puts the files of cfg's dataset and the normalise
    stage reads them: <paths.raw>/<data.name>/."""
    return Path(cfg.paths.raw) / cfg.data.name


def prepare(cfg):
    """What the fetch and normalise stages do for cfg: the verified IDX files in
    raw_dir(cfg), the arrays and their manifest in paths.processed."""
    from pipeline.fetch import fetch
    from pipeline.normalise import normalise

    fetch(cfg.data, raw_dir(cfg))
    normalise(cfg.data, raw_dir(cfg), cfg.paths.processed)


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory):
    """The real MNIST IDX files, fetched once per session through the configured sources."""
    from pipeline.fetch import fetch

    raw = tmp_path_factory.mktemp("mnist_raw")
    fetch(make_cfg().data, raw)
    return raw


def free_port():
    """A port on 127.0.0.1 that nothing listens on (for a server to start, or to be refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ok(args, cwd, env, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stages_run(dvc_output):
    """Names of the stages `dvc repro` ran, in order."""
    return re.findall(r"Running stage '(\w+)'", dvc_output)


def set_yaml_value(path, key, value):
    text = path.read_text()
    new = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    assert new != text
    path.write_text(new)


def copy_checkout(target, untracked=True, skip=()):
    """The checkout's files as a fresh clone would have them: tracked ones (and,
    with `untracked`, new ones git does not ignore), `skip` left out."""
    args = ["git", "ls-files", "-z", "--cached"] + (["--others", "--exclude-standard"] if untracked else [])
    listed = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        if (PROJECT_ROOT / rel).is_file() and rel not in skip:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, target / rel)
    return target


@pytest.fixture
def repo_copy(tmp_path, real_mnist):
    """A fresh clone-like copy: tracked and untracked-but-not-ignored files only."""
    repo = copy_checkout(tmp_path / "repo")
    env = dict(os.environ,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(repo / "src"),  # the copy's code and conf/, not the checkout's
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               MNIST_LOCAL_DIR=str(real_mnist),  # the session's fetch; the npm source stays configured
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    set_yaml_value(repo / "conf/train/sgd.yaml", "epochs", 2)
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "copy"], repo, env)
    return repo, env


# --- a reproduced git + DVC copy of the repository on small fixture datasets ----

CLASSES = {"fixture_a": [str(i) for i in range(10)], "fixture_b": [f"c{i}/x" for i in range(10)]}


def fixture_dataset_conf(name, root, seed):
    """conf/data/<name>.yaml for a synthetic dataset written to root in IDX format."""
    rng = np.random.default_rng(seed)
    (train_x, train_y), (test_x, test_y) = synthetic_digits(rng, 600), synthetic_digits(rng, 200)
    files = {}
    for key, array in {"train_images": train_x, "train_labels": train_y,
                       "test_images": test_x, "test_labels": test_y}.items():
        blob = encode_idx(array)
        file_name = key.replace("_", "-") + "-idx-ubyte"
        (root / file_name).write_bytes(blob)
        files[key] = {"name": file_name, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    return {"name": name, "files": files, "sources": [{"kind": "local", "path": str(root)}],
            "class_names": CLASSES[name], "val_size": 100, "timeout_s": 5}


def edit(path, pattern, replacement):
    text = path.read_text()
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"{pattern!r} not found once in {path}"
    path.write_text(new)


def dvc_env(store):
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}",
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")


@pytest.fixture(scope="session")
def dvc_baseline(tmp_path_factory):
    """A reproduced copy of the repository, trained on fixture_a: (repo dir, store dir)."""
    top = tmp_path_factory.mktemp("config_flow")
    repo, store = top / "repo", top / "store"
    store.mkdir()
    copy_checkout(repo)
    for seed, name in enumerate(CLASSES):
        (top / name).mkdir()
        conf = fixture_dataset_conf(name, top / name, seed)
        (repo / f"conf/data/{name}.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    edit(repo / "conf/config.yaml", r"^  - data: mnist$", "  - data: fixture_a")
    edit(repo / "conf/train/sgd.yaml", r"^epochs: .*$", "epochs: 2")
    edit(repo / "conf/train/sgd.yaml", r"^batch_size: .*$", "batch_size: 32")
    env = dvc_env(store)
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "copy"], repo, env)
    stages = ["resolve", "fetch", "normalise", "train", "evaluate", "export_filters"]
    assert stages_run(run_ok(["dvc", "repro"], repo, env)) == stages
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "reproduced"], repo, env)
    return repo, store


@pytest.fixture
def dvc_work(dvc_baseline, tmp_path):
    """A fresh copy of the reproduced baseline (repository, DVC cache and MLflow store)."""
    repo, store = tmp_path / "repo", tmp_path / "store"
    shutil.copytree(dvc_baseline[0], repo, symlinks=True)
    shutil.copytree(dvc_baseline[1], store)
    return repo, dvc_env(store)


# --- fault injectors shared by the fault tests --------------------------------

@contextlib.contextmanager
def tmpfs(where, size="4m"):
    """A tmpfs of `size` mounted at `where` (the tests run as root), unmounted after; skips
    the test with the reason when mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk):
    """Fill the filesystem until a write fails with ENOSPC."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12):
            try:
                while os.write(fd, bytes(chunk)):
                    pass
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0


_LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


@contextlib.contextmanager
def sqlite_locked(db):
    """Another process holds an exclusive lock on the SQLite file db (MLflow's writes then wait
    20 s each) until the yielded release() is called or the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield lambda: (holder.stdin.write("release\n"), holder.stdin.flush(), holder.wait(timeout=30))
    finally:
        holder.kill()
