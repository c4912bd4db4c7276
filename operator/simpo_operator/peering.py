"""Two or more operator replicas with kopf peering: one serves events (active), the others stand by.

kopf pauses an operator while a live peer of higher priority exists, and pauses every one of them while peers
share a priority: so each replica's priority must be unique. The convention here is seniority, the oldest replica
wins: priority falls with the process's start time (random low digits break ties). A rolling update then hands
over once, when the old active exits (it removes its own peer record on SIGTERM, so the standby resumes at once);
a newcomer never pre-empts a working active. A replica that dies without exiting (SIGKILL, node loss) leaves its
record until it expires: LIFETIME_S after its last keepalive, which kopf sends every second at that lifetime.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

# kopf's keepalive period is max(1, lifetime - randint(5, 10)) s: 1 s here, so a standby takes over at most
# LIFETIME_S (+ one keepalive) after the active stopped, and a keepalive may be late by 4 s before a loaded active
# is taken for dead (then both run for a moment, which the deterministic child names make harmless).
LIFETIME_S = 5
# Priorities stay below 2**53 (exact in JSON numbers): 10**3 tie-breakers per second until the year 2255.
_EPOCH_LIMIT_S = 9_000_000_000


def seniority_priority(started_s: Optional[float] = None) -> int:
    """A priority that is higher the earlier the process started (unique with near certainty)."""
    started = int(time.time() if started_s is None else started_s)
    return (_EPOCH_LIMIT_S - started) * 1000 + random.randrange(1000)


def role(peers: dict[str, Any], identity: str, now: Optional[datetime] = None) -> Optional[str]:
    """"active" or "standby" for `identity` from a peering object's status (kopf's records: identity ->
    {priority, lifetime, lastseen}); None while this replica's own live record is not there (not connected yet,
    or its keepalives do not land)."""
    now = now or datetime.now(timezone.utc)
    live = {}
    for peer, record in (peers or {}).items():
        if not isinstance(record, dict) or "lastseen" not in record:
            continue
        lastseen = datetime.fromisoformat(record["lastseen"])
        if lastseen + timedelta(seconds=int(record.get("lifetime", 60))) > now:
            live[peer] = int(record.get("priority", 0))
    if identity not in live:
        return None
    others = [priority for peer, priority in live.items() if peer != identity]
    return "active" if all(priority < live[identity] for priority in others) else "standby"
