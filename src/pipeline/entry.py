"""The one entry point every stage shares: compose conf/ with Hydra, validate,
check the config against the resolved file when DVC runs the stage, and turn
our errors into a clean exit.

    @stage
    def main(cfg): ...

A PipelineError prints as one message and exits 2, and so do the environment's
faults (OSError: a full disk, a permission; MemoryError); Ctrl-C or SIGTERM (which
tracking turns into KeyboardInterrupt) exits 130. In a sweep, a JobError (a value
of this job refused, a divergence) fails this job only. Run from a subdirectory of
the checkout, a stage moves to the project root first. SystemExit passes through
Hydra's own error reporting untouched, so the user sees our message and not a
stack trace.
"""

import functools
import os
import sys
from pathlib import Path

import hydra
import yaml
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import CONF_DIR, DATASET_FILE, PROJECT_ROOT, RESOLVED_FILE, effective, merge_effective, validate
from pipeline.errors import JobError, PipelineError


def stage(run=None, *, against_resolved=True, record_failed_job=None):
    """Make run(cfg) a Hydra app. against_resolved=False only for the resolve stage itself.
    record_failed_job(cfg, err): records a sweep's job that failed before it started a run."""
    if run is None:
        return functools.partial(stage, against_resolved=against_resolved, record_failed_job=record_failed_job)

    @functools.wraps(run)  # Hydra names the job after run's module (train.log, not entry.log)
    def main(cfg):
        try:
            validate(cfg)
            if against_resolved and os.environ.get("DVC_STAGE"):
                check_resolved(cfg)
            return run(cfg)
        except PipelineError as err:
            if isinstance(err, JobError) and _in_a_sweep():
                return _job_failed(cfg, err, record_failed_job)
            _exit(2, f"error: {err}")
        except KeyboardInterrupt:
            _exit(130, "interrupted: outputs were left as they were (no partial files)")
        except OSError as err:  # the environment: a full disk, a permission, a file gone
            _exit(2, f"error: {_os_error(err)}")
        except MemoryError:
            _exit(2, "error: out of memory: close other programs, or lower train.batch_size or model.hidden")

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(main)

    @functools.wraps(run)
    def launch(*args, **kwargs):
        _at_project_root()
        # Hydra then raises instead of printing half a traceback and exiting 1 (a run directory it
        # cannot create, a bad override): we word those like our own errors. Set it yourself to see
        # Hydra's full tracebacks.
        tracebacks = "HYDRA_FULL_ERROR" in os.environ
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            return app(*args, **kwargs)
        except (HydraException, OSError) as err:
            if tracebacks:
                raise
            _exit(2, f"error: {_hydra_error(err)}")

    return launch


def _exit(code, message):
    print(message, file=sys.stderr)
    raise SystemExit(code) from None


def _at_project_root():
    """Run where conf/ is: from a subdirectory of the checkout, move to its root, so
    outputs/ and the data paths land there (as under DVC), never in src/ or conf/."""
    if not (CONF_DIR / "config.yaml").is_file():
        _exit(2, f"error: no conf/config.yaml in {Path.cwd()} nor in {PROJECT_ROOT}: run the stages from the "
              "root of a clone of the project (`dvc repro`, or `python -m pipeline.train` there), with the "
              "package installed from it (`pip install -e .`)")
    cwd = Path.cwd().resolve()
    if cwd != PROJECT_ROOT.resolve() and PROJECT_ROOT.resolve() in cwd.parents:
        print(f"running in the project root {PROJECT_ROOT} (not in {cwd}): relative paths start there",
              file=sys.stderr)
        os.chdir(PROJECT_ROOT)


def _hydra_error(err):
    """What Hydra or the environment refused, as Hydra itself would print it, in one message."""
    if isinstance(err, HydraException):
        cause = err.__cause__
        return f"{err}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(err)
    return _os_error(err)


def _os_error(err):
    what = err.strerror or type(err).__name__
    where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name)
    return f"{what}: {where}" if where else f"{what} ({err})"


def _in_a_sweep():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(cfg, err, record_failed_job):
    """A sweep's job failed for its own values: recorded FAILED (a run of its own when it
    had none yet), and NaN returned, so the sweep goes on (Optuna counts the trial failed)."""
    print(f"error: {err} (this job failed; the sweep goes on)", file=sys.stderr)
    if getattr(err, "run_id", None) is None and record_failed_job is not None:
        record_failed_job(cfg, err)
    return float("nan")


def check_resolved(cfg):
    """Refuse to run when conf/ composes to something else than the resolved file
    DVC tracked, e.g. after `dvc repro -s train` following an edit of conf/."""
    files = {}
    for file in (RESOLVED_FILE, DATASET_FILE):
        path = PROJECT_ROOT / file
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run `dvc repro`, whose first stage (resolve) writes it")
        try:
            files[file] = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PipelineError(f"{path} is not YAML ({err}): run `dvc repro`, whose resolve stage rewrites it") \
                from err
    try:
        written = merge_effective(files)
    except (KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{RESOLVED_FILE} and {DATASET_FILE} do not hold a config (no {err}): run `dvc repro`, "
                            "whose resolve stage rewrites them") from err
    composed = effective(cfg)
    if written != composed:
        keys = sorted(k for k in set(_flat(written)) | set(_flat(composed))
                      if _flat(written).get(k) != _flat(composed).get(k))
        shown = ", ".join(f"{k} (conf/: {_flat(composed).get(k)!r}, file: {_flat(written).get(k)!r})"
                          for k in keys[:5])
        raise PipelineError(
            f"conf/ has changed since {RESOLVED_FILE} and {DATASET_FILE} were written: {shown}"
            f"{' ...' if len(keys) > 5 else ''}. Run `dvc repro` (its resolve stage rewrites the files "
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
