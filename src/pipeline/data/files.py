"""Atomic file output and checksums.

Every output is written under a temporary name in its final directory and
renamed into place only when complete, so a crash or Ctrl-C never leaves a
half-written file under the real name, and a good file is replaced only by
another complete one. A write that fails (disk full, permission denied,
read-only filesystem) raises a PipelineError naming the file; its temporary
file is removed and the previous file, if any, is kept as it was.
"""

import contextlib
import errno
import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

# Fixed zip member timestamp: np.savez stamps the current time, which would make
# two trainings with the same seed differ in bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failure(path, err, kept=None):
    """A PipelineError for an OSError met while writing `path`."""
    path = Path(path)
    why = err.strerror or str(err)
    if err.errno in _FULL:
        what = f"the filesystem holding {path.parent} is full ({why})"
        fix = "free some space (or point the output elsewhere) and run again"
    else:
        what = why
        fix = f"check that {path.parent} is writable and run again"
    other = f" (at {err.filename})" if err.filename and Path(str(err.filename)) != path else ""
    if kept is None:
        kept = path.exists()
    kept_note = f"; the previous {path.name} was kept unchanged" if kept else "; no partial file was left"
    return PipelineError(f"cannot write {path}: {what}{other}{kept_note}. Fix: {fix}.")


def _mkstemp(path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
    finally:
        os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_paths(paths):
    """Yield one temporary path next to each of `paths`; rename them all into
    place only once every one is complete (the last path last), so a failure
    in any of them leaves every previous file as it was."""
    paths = [Path(p) for p in paths]
    temps, current = [], None
    try:
        for path in paths:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_mkstemp(path))
        current = None
        yield temps
        for path, tmp in zip(paths, temps):
            current = path
            os.replace(tmp, path)
    except OSError as err:
        target = current or _guess(err, paths, temps)
        raise write_failure(target, err) from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _guess(err, paths, temps):
    """The output an OSError raised in the body was about (its temporary file's), else the first."""
    name = str(err.filename or "")
    for path, tmp in zip(paths, temps):
        if name in (str(tmp), str(path)):
            return path
    return paths[0]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` on success."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npy(tmp, array):
    """The .npy bytes of `array` into the (temporary) file `tmp`; no pickles."""
    with open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npy(path, array):
    with atomic_path(path) as tmp:
        write_npy(tmp, array)


def save_npz(path, arrays):
    """Like np.savez, but byte-identical for identical arrays (fixed timestamps)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", _ZIP_EPOCH), buf.getvalue())


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
