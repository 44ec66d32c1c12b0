"""The error types for bad input or environment."""


class PipelineError(Exception):
    """Bad input or environment: the message names the file, key or value,
    what was expected, and how to fix it. Stages print it without a traceback
    and exit with status 2 (pipeline.entry)."""


class JobError(PipelineError):
    """A failure of this job's own values: a config value refused, a training that
    diverged. In a sweep, this job is recorded FAILED and the others go on; any
    other error (data, store, environment) is common to the jobs and stops it."""


class ConfigError(JobError):
    """A config value out of range (pipeline.config.validate)."""
