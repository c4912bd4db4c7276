"""Errors that no restart can fix, each carrying its exit code from the contract (contract.api.ExitCode)."""

from simpo_worker.contract.api import ExitCode


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


class OutOfMemoryError(NonRetryableError, MemoryError):
    """A program does not fit its devices' memory: a restart would run out the same way."""

    exit_code = ExitCode.OUT_OF_MEMORY


# XLA's words for a program or buffer that does not fit its device: status RESOURCE_EXHAUSTED at compile time
# ("Ran out of memory on HBM ...") and at run time ("Error allocating device buffer ..."), or, when the failure
# surfaces through dispatch, another status around "Out of memory allocating N bytes" (the CPU client).
_JAX_ERRORS = ("JaxRuntimeError", "XlaRuntimeError")
_MEMORY_WORDS = ("memory", "allocat", "hbm")


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-memory errors, also as the cause or context of `error`. Checked by class name and
    message, so this module stays free of JAX."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        message = str(error).lower()
        if type(error).__name__ in _JAX_ERRORS and ("out of memory" in message or (
                "resource_exhausted" in message and any(word in message for word in _MEMORY_WORDS))):
            return True
        error = error.__cause__ or error.__context__
    return False
