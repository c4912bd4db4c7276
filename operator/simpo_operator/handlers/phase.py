"""A job's status patch for a phase, with the Kubernetes event and the metric of a transition."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import kopf

from simpo_operator import metrics, status as state


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _post_transition(job: dict[str, Any], phase: state.Phase) -> None:
    metrics.TRANSITIONS.labels(phase.phase, phase.reason).inc()
    kopf.event(job, type=state.event_type(phase), reason=phase.phase,
               message=f"{phase.reason}: {phase.message}" if phase.message else phase.reason)


def phase_patch(job: dict[str, Any], current: dict[str, Any], phase: state.Phase,
                restarts: Optional[int], admitted: Optional[bool] = None) -> Optional[dict[str, Any]]:
    """The status patch for `phase` if it changes anything (None otherwise), posting an event on a transition."""
    if not state.is_transition(current, phase) and (restarts is None or current.get("restarts") == restarts):
        return None
    if state.is_transition(current, phase):
        _post_transition(job, phase)
    return state.status_patch(current, phase, now=_now(), generation=job["metadata"].get("generation"),
                              restarts=restarts, admitted=admitted)

