"""Errors that no restart can fix, each carrying its exit code from the contract (simpo_worker.api.ExitCode)."""

from simpo_worker.api import ExitCode


class NonRetryableError(Exception):
    """A failure a restart cannot fix. Subclasses carry their own exit code."""

    exit_code = ExitCode.BAD_CONFIG


class ConfigError(NonRetryableError, ValueError):
    exit_code = ExitCode.BAD_CONFIG


class DataError(NonRetryableError, ValueError):
    exit_code = ExitCode.BAD_DATA


class ModelError(NonRetryableError, ValueError):
    exit_code = ExitCode.BAD_MODEL


class OutputError(NonRetryableError, OSError):
    exit_code = ExitCode.OUTPUT_UNUSABLE
