"""The status state machine: the JobSet's state -> the SimpoInterleaveJob's phase, conditions and times. Pure.

    Pending     the JobSet exists; its worker pods are not all ready yet (first attempt, or after a resume)
    Running     every worker pod of every slice is ready
    Restarting  the JobSet restarted every pod after a retryable failure; the new attempt is not all ready yet
    Suspended   spec.suspend is true (the JobSet and its pods are suspended)
    Succeeded   the JobSet completed (every worker exited 0)                                       terminal
    Failed      the JobSet failed (non-retryable exit code, or maxRestarts used up), or the spec   terminal
                is invalid (reason InvalidSpec: no JobSet is created), or a child name is taken

Terminal phases are final, except Failed/InvalidSpec, which a corrected spec re-validates. The operator writes
everything here except `status.progress`, which belongs to the worker leader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Optional

from simpo_operator.resource import FINISHED_PHASES
from simpo_worker.api import EXIT_CODE_MEANINGS, ExitCode

INVALID_SPEC = "InvalidSpec"
CHILD_CONFLICT = "ChildConflict"


@dataclass(frozen=True)
class Phase:
    phase: str
    reason: str
    message: str


def _condition(jobset: dict[str, Any], kind: str) -> Optional[dict[str, Any]]:
    for condition in jobset.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def phase_of(jobset: dict[str, Any], suspend: bool) -> Phase:
    """The phase a JobSet stands for; `suspend` is the job's spec.suspend (the JobSet may lag behind it)."""
    for kind, phase in (("Completed", "Succeeded"), ("Failed", "Failed")):
        condition = _condition(jobset, kind)
        if condition is not None:
            return Phase(phase, condition.get("reason") or kind, condition.get("message") or "")
    if suspend or jobset.get("spec", {}).get("suspend") or _condition(jobset, "Suspended"):
        return Phase("Suspended", "Suspended", "spec.suspend is true: the JobSet and its pods are suspended")
    status = jobset.get("status", {})
    replicated = {rj.get("name"): rj for rj in status.get("replicatedJobsStatus") or []}
    expected = {rj["name"]: rj.get("replicas", 1) for rj in jobset.get("spec", {}).get("replicatedJobs", [])}
    ready = sum(replicated.get(name, {}).get("ready", 0) for name in expected)
    total = sum(expected.values())
    restarts = status.get("restarts") or 0
    if total and ready >= total:
        return Phase("Running", "AllHostsReady", f"all {total} slice job(s) have every worker pod ready")
    if restarts:
        return Phase("Restarting", "JobSetRestarted",
                     f"restart {restarts}: waiting for the workers to be ready again ({ready}/{total} slices ready)")
    return Phase("Pending", "WaitingForPods", f"waiting for worker pods ({ready}/{total} slices ready)")


def is_final(status: dict[str, Any]) -> bool:
    """Finished for good: nothing the operator sees can change it (a fixed spec can revive InvalidSpec)."""
    return status.get("phase") in FINISHED_PHASES and status.get("reason") != INVALID_SPEC


def status_patch(current: dict[str, Any], new: Phase, *, now: str, generation: Optional[int],
                 restarts: Optional[int] = None) -> dict[str, Any]:
    """The phase fields to merge-patch for `new`; `current` is the resource's status now. Never `progress`."""
    patch: dict[str, Any] = {"phase": new.phase, "reason": new.reason, "message": new.message}
    if restarts is not None:
        patch["restarts"] = restarts
    if new.phase == "Running" and not current.get("startTime"):
        patch["startTime"] = now
    if new.phase in FINISHED_PHASES and not current.get("completionTime"):
        patch["completionTime"] = now
    patch["conditions"] = _conditions(current.get("conditions") or [], new, now, generation)
    return patch


def _conditions(conditions: list[dict[str, Any]], new: Phase, now: str,
                generation: Optional[int]) -> list[dict[str, Any]]:
    """One condition per phase ever reached: the current one True, the others False since they were left."""
    by_type = {condition["type"]: dict(condition) for condition in conditions}
    for kind, condition in by_type.items():
        if kind != new.phase and condition["status"] == "True":
            condition.update(status="False", lastTransitionTime=now, observedGeneration=generation,
                             reason=new.reason, message=f"left {kind}: now {new.phase}")
    previous = by_type.get(new.phase)
    changed_at = previous["lastTransitionTime"] if previous and previous["status"] == "True" else now
    by_type[new.phase] = {"type": new.phase, "status": "True", "reason": new.reason, "message": new.message,
                          "lastTransitionTime": changed_at, "observedGeneration": generation}
    return [by_type[kind] for kind in sorted(by_type)]


def is_transition(current: dict[str, Any], new: Phase) -> bool:
    return current.get("phase") != new.phase or current.get("reason") != new.reason


def event_type(phase: Phase) -> str:
    return "Warning" if phase.phase == "Failed" or phase.phase == "Restarting" else "Normal"


# JobSet names the Job that failed it ("... (first failed job: NAME)"); that Job's Failed condition, set by the pod
# failure policy, names the exit code ("Container worker for pod NS/POD failed with exit code 14 matching FailJob
# rule at index 0"). Neither message is an API field, hence the patterns; a mismatch only loses the explanation.
_FIRST_FAILED_JOB = re.compile(r"\(first failed job: ([a-z0-9.-]+)\)")
_EXIT_CODE = re.compile(r"failed with exit code (\d+)")


def first_failed_job(phase: Phase) -> Optional[str]:
    """The Job that a Failed JobSet names as the first to fail."""
    match = _FIRST_FAILED_JOB.search(phase.message) if phase.phase == "Failed" else None
    return match.group(1) if match else None


def failed_exit_code(job: Optional[dict[str, Any]]) -> Optional[int]:
    """The worker exit code that failed a batch/v1 Job through its pod failure policy, if that is how it failed."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            match = _EXIT_CODE.search(condition.get("message") or "")
            if match:
                return int(match.group(1))
    return None


def exit_code_meaning(code: int) -> str:
    try:
        return EXIT_CODE_MEANINGS[ExitCode(code)]
    except ValueError:
        return "not one of the worker's exit codes"


def with_exit_code(phase: Phase, code: Optional[int]) -> Phase:
    """The phase with the worker exit code behind it, and what that code means, added to its message."""
    if code is None:
        return phase
    return replace(phase, message=f"worker exit code {code}: {exit_code_meaning(code)}; {phase.message}")
