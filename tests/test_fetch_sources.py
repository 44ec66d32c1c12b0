"""The HTTP and tarball paths of fetch, against a server and archives made here."""

import functools
import gzip
import http.server
import io
import tarfile
import threading

import pytest

from pipeline.config import SourceSpec
from pipeline.data.files import sha256_of
from pipeline.data.sources import _refuse_unsafe_member
from pipeline.errors import PipelineError
from pipeline.fetch import fetch


@pytest.fixture
def mirror(tmp_path, idx_fixture):
    """A loopback HTTP server with the fixture files gzipped under /mnist/."""
    root, specs = idx_fixture
    site = tmp_path / "site" / "mnist"
    site.mkdir(parents=True)
    for spec in specs.values():
        (site / f"{spec['name']}.gz").write_bytes(gzip.compress((root / spec["name"]).read_bytes()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_http_source_after_a_404_mirror(fixture_cfg, mirror, tmp_path):
    fixture_cfg.data.sources = [SourceSpec("http", url=f"{mirror}/missing/"),
                                SourceSpec("http", url=f"{mirror}/mnist/")]
    fetch(fixture_cfg.data, tmp_path / "raw")
    for spec in fixture_cfg.data.files.values():
        assert sha256_of(tmp_path / "raw" / spec.name) == spec.sha256


def test_all_sources_failing_lists_each(fixture_cfg, mirror, tmp_path):
    fixture_cfg.data.sources = [SourceSpec("http", url=f"{mirror}/missing/"),
                                SourceSpec("local", path=str(tmp_path / "nowhere"))]
    with pytest.raises(PipelineError) as info:
        fetch(fixture_cfg.data, tmp_path / "raw")
    message = str(info.value)
    assert f"{mirror}/missing/" in message and "404" in message
    assert str(tmp_path / "nowhere") in message
    assert list((tmp_path / "raw").iterdir()) == []


def _tar_with(tmp_path, member):
    path = tmp_path / "evil.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return tarfile.open(path)


@pytest.mark.parametrize("name, kind, target", [
    ("../outside", tarfile.REGTYPE, ""),
    ("/etc/evil", tarfile.REGTYPE, ""),
    ("package/data/link", tarfile.SYMTYPE, "/etc/passwd"),
    ("package/data/link2", tarfile.SYMTYPE, "../../../../outside"),
])
def test_hostile_tar_members_are_refused(tmp_path, name, kind, target):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    member.size = 1 if kind == tarfile.REGTYPE else 0
    with _tar_with(tmp_path, member) as tar:
        (found,) = tar.getmembers()
        with pytest.raises(PipelineError, match="refusing"):
            _refuse_unsafe_member(found, tmp_path / "evil.tgz", tmp_path / "target")
