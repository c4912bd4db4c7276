"""A burst of job creations: while JobSets are being created, the other API calls (ConfigMaps, status patches,
the JobSet events' status work) wait for a quiet moment, so the API server serves the creations users wait for."""

from __future__ import annotations

import threading
import time
from typing import Any

# How long the other API calls of a burst of creations wait for its JobSets before they go ahead anyway, and for how
# long none must have been created: a gap between two creations is no end of the burst, and the last JobSets'
# watch events (what users wait for) reach their watchers in that moment, not behind the writes held back.
CREATIONS_FIRST_S, CREATIONS_QUIET_S = 2.0, 0.25


class CreationBurst:
    """How many `reconcile` calls are creating a JobSet, and a wait for none to have been for a moment."""

    def __init__(self) -> None:
        self.count = 0
        self.idle_since = time.monotonic()
        self.changed = threading.Condition()

    def __enter__(self) -> None:
        with self.changed:
            self.count += 1

    def __exit__(self, *_: Any) -> None:
        with self.changed:
            self.count -= 1
            if self.count == 0:
                self.idle_since = time.monotonic()
                self.changed.notify_all()

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Until no JobSet has been created for `quiet_s`, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while (now := time.monotonic()) < deadline:
                if self.count == 0 and now - self.idle_since >= quiet_s:
                    return
                until = self.idle_since + quiet_s if self.count == 0 else deadline
                self.changed.wait(min(until, deadline) - now)


# The operator's one burst: `reconcile` counts its JobSet creations in it, the others wait on it.
creations = CreationBurst()
