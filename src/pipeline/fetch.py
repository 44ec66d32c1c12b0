"""Stage 1, fetch: put the four verified IDX files of the dataset in <out>/<data.name>/.

Sources are tried in the order conf/data lists them. A file is written under a
temporary name and renamed only once its SHA-256 (of the uncompressed bytes)
matches, so the output never holds a partial or unverified file. Files already
present and verified are kept and not fetched again; each dataset has its own
directory, so switching datasets back and forth fetches nothing twice.
"""

import logging
import shutil
from pathlib import Path

from pipeline.data.files import atomic_path, sha256_of
from pipeline.data.sources import OPENERS, SOURCE_ERRORS, describe
from pipeline.entry import output_dir, stage
from pipeline.errors import PipelineError

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
            continue  # an optional local directory that is not configured
        where = describe(source)
        log.info("fetching %s from %s", ", ".join(s.name for s in missing), where)
        try:  # the first failure ends this source; the next one gets what is still missing
            with OPENERS[source.kind](source, data) as open_file:
                for spec in list(missing):
                    with open_file(spec) as (stream, origin):
                        _install(stream, spec, out_dir, origin)
                    missing.remove(spec)
        except SOURCE_ERRORS as err:
            log.warning("source %s failed: %s", where, err)
            failures.append(f"  - {where}: {err}")
    if missing:
        raise PipelineError(
            f"could not fetch {', '.join(s.name for s in missing)} into {out_dir}. Tried:\n"
            + "\n".join(failures or ["  (no usable source in conf/data)"])
            + f"\nFix a source in conf/data/{data.name}.yaml, or point its local source at a directory "
            "holding the files."
        )
    log.info("all %d files of %s present and verified in %s", len(data.files), data.name, out_dir)


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


@stage
def main(cfg):
    fetch(cfg.data, output_dir() / cfg.data.name)


if __name__ == "__main__":
    main()
