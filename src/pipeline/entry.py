"""The one entry point every stage shares: compose conf/ with Hydra, validate,
check the config against the resolved file when DVC runs the stage, and turn
our errors into a clean exit.

    @stage
    def main(cfg): ...

A PipelineError prints as one message and exits 2; Ctrl-C or SIGTERM (which
tracking turns into KeyboardInterrupt) exits 130. SystemExit passes through
Hydra's own error reporting untouched, so the user sees our message and not a
stack trace.
"""

import functools
import os
import sys
from pathlib import Path

import hydra
import yaml

from pipeline.config import CONF_DIR, PROJECT_ROOT, RESOLVED_FILE, effective, validate
from pipeline.errors import PipelineError


def stage(run=None, *, against_resolved=True):
    """Make run(cfg) a Hydra app. against_resolved=False only for the resolve stage itself."""
    if run is None:
        return functools.partial(stage, against_resolved=against_resolved)

    @functools.wraps(run)  # Hydra names the job after run's module (train.log, not entry.log)
    def main(cfg):
        try:
            validate(cfg)
            if against_resolved and os.environ.get("DVC_STAGE"):
                check_resolved(cfg)
            return run(cfg)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: outputs were left as they were (no partial files)", file=sys.stderr)
            raise SystemExit(130) from None

    return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(main)


def check_resolved(cfg):
    """Refuse to run when conf/ composes to something else than the resolved file
    DVC tracked, e.g. after `dvc repro -s train` following an edit of conf/."""
    path = PROJECT_ROOT / RESOLVED_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run `dvc repro`, whose first stage (resolve) writes it")
    try:
        written = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not YAML ({err}): run `dvc repro`, whose resolve stage rewrites it") from err
    composed = effective(cfg)
    if written != composed:
        keys = sorted(k for k in set(_flat(written)) | set(_flat(composed))
                      if _flat(written).get(k) != _flat(composed).get(k))
        shown = ", ".join(f"{k} (conf/: {_flat(composed).get(k)!r}, file: {_flat(written).get(k)!r})"
                          for k in keys[:5])
        raise PipelineError(
            f"conf/ has changed since {RESOLVED_FILE} was written: {shown}"
            f"{' ...' if len(keys) > 5 else ''}. Run `dvc repro` (its resolve stage rewrites the file "
            "first), not a single stage with -s."
        )


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def output_dir() -> Path:
    """This run's output directory: outputs/<date>/<time> for an ad hoc run,
    the DVC output when dvc.yaml pins it with hydra.run.dir."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
