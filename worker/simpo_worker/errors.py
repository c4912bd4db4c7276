"""Errors that no restart can fix, and the process exit codes reserved for them.

Exit codes are an interface with the operator: the JobSet pod failure policy fails the whole job at once on
these codes, and restarts (resuming from the newest checkpoint) on any other non-zero code.
"""


class NonRetryableError(Exception):
    """A failure a restart cannot fix. Subclasses carry their own exit code."""

    exit_code = 10


class ConfigError(NonRetryableError, ValueError):
    exit_code = 10


class DataError(NonRetryableError, ValueError):
    exit_code = 11


class ModelError(NonRetryableError, ValueError):
    exit_code = 12


class OutputError(NonRetryableError, OSError):
    exit_code = 13


# Sorted, for the JobSet pod failure policy (onExitCodes In [...]).
NON_RETRYABLE_EXIT_CODES = (10, 11, 12, 13)
EXIT_CODE_MEANINGS = {
    0: "done",
    10: "bad config",
    11: "bad data (preference data, prompts)",
    12: "bad or missing model (weights, tokenizer)",
    13: "output dir not usable",
}
