"""The worker's log lines: text for a terminal, or with SIMPO_LOG_FORMAT=json one JSON object per line, the shape
GKE's logging agent turns into a structured Cloud Logging entry: `severity` and `message` are its own fields,
`logging.googleapis.com/sourceLocation` its source link, and everything else (`host`, `step`, `logger`) lands in
jsonPayload, so a query such as `jsonPayload.host=3 AND severity>=WARNING` finds one host's trouble.

The stdlib formatter is enough for this: the mapping to Cloud Logging's field names is the whole of it.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

from simpo_worker.contract.api import ENV_LOG_FORMAT, LOG_FORMATS
from simpo_worker.contract.errors import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Process-wide (every thread's lines carry them): this process's jax.process_index() once jax.distributed is up,
# and the train step the run is at.
_context: dict[str, int | None] = {"host": None, "step": None}


def set_context(*, host: int | None = None, step: int | None = None) -> None:
    if host is not None:
        _context["host"] = host
    if step is not None:
        _context["step"] = step


class CloudLoggingJson(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "logger": record.name,
            "host": _context["host"],
            "step": _context["step"],
            "logging.googleapis.com/sourceLocation": {"file": record.pathname, "line": record.lineno,
                                                      "function": record.funcName},
        }
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str | None = None) -> None:
    """The root logger's one handler, in `log_format` (default: $SIMPO_LOG_FORMAT, else text)."""
    log_format = log_format or os.environ.get(ENV_LOG_FORMAT) or "text"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{ENV_LOG_FORMAT}: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(CloudLoggingJson() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    # force: importing Orbax puts absl's handler on the root logger.
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
