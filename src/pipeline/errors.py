"""One error type for bad input, and the wrapper that turns it into a clean exit."""

import functools
import sys


class PipelineError(Exception):
    """Bad input or environment: the message names the file, key or value,
    what was expected, and how to fix it. Stages print it without a traceback."""


def exit_on_pipeline_error(stage_main):
    """Print a PipelineError as one readable message and exit with status 2;
    exit 130 on Ctrl-C or SIGTERM (which tracking turns into KeyboardInterrupt).

    SystemExit passes through Hydra's own error reporting untouched, so the
    user sees our message and not a stack trace.
    """

    @functools.wraps(stage_main)
    def wrapper(*args, **kwargs):
        try:
            return stage_main(*args, **kwargs)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: outputs were left as they were (no partial files)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
