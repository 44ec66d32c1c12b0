"""Stage 1, fetch: put the four verified IDX files of the dataset in <out>/<data.name>/.

Sources are tried in the order conf/data lists them; a source that fails for one
file still supplies the others. Every file is written in a scratch directory
beside the output (data/raw-fetch/tmp/ when DVC runs the stage: outside the DVC
output, on the same filesystem) and renamed into place only once its size and
SHA-256 (of the uncompressed bytes) match, so the output never holds a
partial, temporary or unverified file; at most the expected size is read, so a
small .gz cannot fill the disk. The scratch directory of a fetch that was
killed is removed by the next one.

Files already present and verified are kept and not fetched again; each dataset
has its own directory, so switching datasets back and forth fetches nothing
twice. A present file that does not match the config is never deleted: it is
moved to data/raw-fetch/moved-aside/<data.name>/ (the config's checksum may be
the wrong one), and the log and any error say where.
"""

import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.data.files import atomic_path, sha256_of, write_failure
from pipeline.data.sources import OPENERS, SOURCE_ERRORS, SourceUnavailable, describe
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SCRATCH, ASIDE = "tmp", "moved-aside"


class _WriteFailed(PipelineError):
    """Writing into the output or scratch directory failed (disk full): no other source can help."""


def work_dir_for(out_dir):
    """The default scratch + moved-aside directory: beside out_dir, so outside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}-fetch")


def fetch(data, out_dir, work_dir=None):
    """Make `out_dir` hold every file of `data.files`, verified. Raises
    PipelineError listing each source and why it failed if any file is missing.
    `work_dir` (default: beside out_dir) holds the scratch files and the files
    moved aside; it must be outside any DVC output."""
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else work_dir_for(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir, work_dir)
    moved = []
    missing = [spec for spec in data.files.values() if not _present_and_verified(out_dir, spec, work_dir, moved)]
    failures = []
    if missing:
        scratch = _new_scratch(work_dir)
        try:
            for source in data.sources:
                if not missing:
                    break
                if source.kind == "local" and not source.path:
                    continue  # an optional local directory that is not configured
                failures += _try_source(source, data, missing, out_dir, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            _remove_if_empty(work_dir / SCRATCH, work_dir)
    if missing:
        raise PipelineError(
            f"could not fetch {', '.join(s.name for s in missing)} into {out_dir}. Tried:\n"
            + "\n".join(failures or ["  (no usable source in conf/data)"])
            + "".join(f"\n{line}" for line in moved)
            + f"\nFix a source in conf/data/{data.name}.yaml, or point its local source at a directory "
            "holding the files."
        )
    log.info("all %d files of %s present and verified in %s", len(data.files), data.name, out_dir)


def _try_source(source, data, missing, out_dir, scratch):
    """Install what `source` has of `missing` (removing each installed spec); the failure lines."""
    where = describe(source)
    log.info("fetching %s from %s", ", ".join(s.name for s in missing), where)
    errors = []
    try:
        with OPENERS[source.kind](source, data, scratch) as open_file:
            for spec in list(missing):
                try:
                    with open_file(spec) as (stream, origin):
                        _install(stream, spec, out_dir, origin, scratch)
                    missing.remove(spec)
                except (_WriteFailed, SourceUnavailable):
                    raise
                except SOURCE_ERRORS as err:  # this file only: the source may still have the others
                    errors.append(_naming(err, spec))
    except _WriteFailed:
        raise
    except SOURCE_ERRORS as err:
        errors.append(str(err))
    for error in errors:
        log.warning("source %s failed: %s", where, error)
    return [f"  - {where}: {'; '.join(errors)}"] if errors else []


def _naming(err, spec):
    text = str(err) or type(err).__name__
    return text if spec.name in text else f"{spec.name}: {text}"


def _present_and_verified(out_dir, spec, work_dir, moved):
    path = out_dir / spec.name
    if not path.exists():
        return False
    size, digest = path.stat().st_size, sha256_of(path)
    if (size, digest) == (spec.size, spec.sha256):
        return True
    aside = work_dir / ASIDE / out_dir.name / f"{spec.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    try:
        aside.parent.mkdir(parents=True, exist_ok=True)
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        shutil.move(path, aside)  # a rename on the same filesystem
    except OSError as err:
        raise PipelineError(f"{path} does not match the config (got {size} bytes, sha256 {digest}; expected "
                            f"{spec.size} bytes, sha256 {spec.sha256}) and could not be moved aside to {aside}: "
                            f"{err.strerror or err}. Move or delete it yourself and run again.") from None
    line = (f"{path} did not match the config (got {size} bytes, sha256 {digest}; expected {spec.size} "
            f"bytes, sha256 {spec.sha256}): it was moved to {aside}. If the config's checksum is the wrong "
            "one, fix it and move the file back.")
    log.warning("%s Fetching it again.", line)
    moved.append(line)
    return False


def _install(stream, spec, out_dir, origin, scratch):
    """Copy at most spec.size bytes of `stream` to out_dir/spec.name if they match spec; else raise."""
    tmp, target = scratch / spec.name, out_dir / spec.name
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            while True:
                try:
                    block = stream.read(min(1 << 20, spec.size + 1 - size))
                except (OSError, EOFError) as err:  # a bad .gz, a cut download: another source may do
                    raise PipelineError(f"{origin}: cannot read it ({type(err).__name__}: {err})") from None
                if not block:
                    break
                size += len(block)
                if size > spec.size:
                    raise PipelineError(
                        f"{origin}: more data than the expected {spec.size} bytes of {spec.name} (its size in "
                        "conf/data); stopped reading there, nothing was kept. The source holds another file "
                        "(or a decompression bomb)")
                digest.update(block)
                _write(f, block, tmp, target)
        if (size, digest.hexdigest()) != (spec.size, spec.sha256):
            raise PipelineError(
                f"{origin}: checksum mismatch (got {size} bytes, sha256 {digest.hexdigest()}; "
                f"expected {spec.size} bytes, sha256 {spec.sha256})"
            )
        try:
            os.replace(tmp, target)
        except OSError as err:
            if err.errno != errno.EXDEV:  # EXDEV: the scratch directory is on another filesystem
                raise _WriteFailed(str(write_failure(target, err, kept=False))) from None
            with atomic_path(target) as final:  # a PipelineError (disk full) ends the fetch
                shutil.copyfile(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _write(f, block, tmp, target):
    try:
        f.write(block)
    except OSError as err:
        raise _WriteFailed(str(write_failure(tmp, err, kept=False)) + f" (while fetching {target})") from None


def _new_scratch(work_dir):
    """A scratch directory of this process: work_dir/tmp/<pid>-<time>."""
    scratch = work_dir / SCRATCH / f"{os.getpid()}-{time.time_ns()}"
    try:
        scratch.mkdir(parents=True)
    except OSError as err:
        raise PipelineError(str(write_failure(scratch, err, kept=False))) from None
    return scratch


def _remove_leftovers(out_dir, work_dir):
    """What a killed fetch left: temporary files in out_dir (an older fetch wrote them there)
    and scratch directories of processes that no longer run."""
    for leftover in out_dir.glob(".*.tmp"):
        if leftover.is_file():
            log.info("removing %s, left by an interrupted run", leftover)
            leftover.unlink()
    scratch_root = work_dir / SCRATCH
    if scratch_root.is_dir():
        for entry in scratch_root.iterdir():
            if not _alive(entry.name.partition("-")[0]):
                log.info("removing %s, left by an interrupted fetch", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        _remove_if_empty(scratch_root, work_dir)


def _alive(pid_text):
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False  # our own pid: a leftover of an earlier process with the same pid
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_if_empty(*dirs):
    for directory in dirs:
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty (moved-aside files, another fetch running) or already gone


@stage
def main(cfg):
    root = output_dir()  # DVC pins it to data/raw, the stage's output
    fetch(cfg.data, root / cfg.data.name, work_dir=work_dir_for(root))


if __name__ == "__main__":
    main()
