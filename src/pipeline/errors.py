"""One error type for bad input or environment."""


class PipelineError(Exception):
    """Bad input or environment: the message names the file, key or value,
    what was expected, and how to fix it. Stages print it without a traceback
    and exit with status 2 (pipeline.entry)."""
