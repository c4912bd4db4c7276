"""ttlSecondsAfterFinished: the finished job is deleted; its children follow through owner references."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any, Optional

import kopf

from simpo_operator import kube, metrics
from simpo_operator.resource import FINISHED_PHASES
from simpo_worker.contract.api import GROUP, PLURAL, VERSION

# ttlSecondsAfterFinished: one timer per finished job, armed from its events (the initial listing re-arms them
# after an operator restart), so no finalizer or polling is needed.
_expiry_timers: dict[str, asyncio.TimerHandle] = {}
_expiry_tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly: keep them until done
EXPIRY_RETRY_S = 30


def expiry_delay(resource: dict[str, Any], now: datetime) -> Optional[float]:
    """Seconds until a finished job with ttlSecondsAfterFinished is due for deletion; None if it never is."""
    ttl = (resource.get("spec") or {}).get("ttlSecondsAfterFinished")
    status = resource.get("status") or {}
    if ttl is None or status.get("phase") not in FINISHED_PHASES or not status.get("completionTime"):
        return None
    finished = datetime.strptime(status["completionTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max(0.0, (finished - now).total_seconds() + ttl)


@kopf.on.event(GROUP, VERSION, PLURAL)
@metrics.timed("expire_finished")
async def expire_finished(body: kopf.Body, type: Optional[str], logger: logging.Logger, **_: Any) -> None:
    uid = body.metadata.uid
    # Every job event passes here: one handler, as each costs kopf's dispatch on the event loop.
    metrics.JOB_PHASES.observe(uid, body.get("status"), deleted=type == "DELETED")
    if type == "DELETED":
        timer = _expiry_timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        return
    # Read-only: no copy of the whole body (its config is large) on every event.
    delay = expiry_delay({"spec": body.spec, "status": body.status}, datetime.now(timezone.utc))
    if delay is None or uid in _expiry_timers:
        return
    namespace, name = body.metadata.namespace, body.metadata.name
    logger.info(f"finished; deleting in {delay:.0f}s (ttlSecondsAfterFinished)")
    loop = asyncio.get_running_loop()

    def start_expiry() -> None:
        task = loop.create_task(_expire(namespace, name, uid, logger))
        _expiry_tasks.add(task)
        task.add_done_callback(_expiry_tasks.discard)

    _expiry_timers[uid] = loop.call_later(delay, start_expiry)


async def _expire(namespace: str, name: str, uid: str, logger: logging.Logger) -> None:
    while True:
        try:
            await asyncio.to_thread(kube.delete_job, namespace, name, uid)
            return
        except kube.kubernetes.client.ApiException as error:
            logger.error(f"ttlSecondsAfterFinished: deleting {namespace}/{name} failed ({error.status} "
                         f"{error.reason}); retrying in {EXPIRY_RETRY_S}s")
            await asyncio.sleep(EXPIRY_RETRY_S)
