"""The status state machine: the JobSet's state -> the SimpoInterleaveJob's phase, conditions and times. Pure.

    Queued      spec.queueName: the JobSet waits, suspended, for Kueue to admit it (or was preempted by Kueue)
    Pending     the JobSet exists; its worker pods are not all ready yet (first attempt, or after a resume)
    Running     every worker pod of every slice is ready
    Restarting  the JobSet restarted every pod after a retryable failure; the new attempt is not all ready yet
    Suspended   spec.suspend is true (the JobSet and its pods are suspended)
    Succeeded   the JobSet completed (every worker exited 0)                                       terminal
    Failed      the JobSet failed (non-retryable exit code, or maxRestarts used up), or the spec   terminal
                is invalid (reason InvalidSpec: no JobSet is created), or a child name is taken

A job with spec.queueName also has an `Admitted` condition: True once Kueue unsuspended its JobSet, False while
it is queued. Kueue alone suspends and unsuspends such a JobSet, so its suspend state is Kueue's admission.

Terminal phases are final, except Failed/InvalidSpec, which a corrected spec re-validates. The operator writes
everything here except `status.progress`, which belongs to the worker leader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Optional

from simpo_operator.pod_env import COMPLETION_INDEX_ANNOTATION, JOB_INDEX_ANNOTATION
from simpo_operator.render import CONTAINER
from simpo_operator.resource import FINISHED_PHASES, PHASES, QUEUE_NAME_LABEL
from simpo_worker.contract.api import EXIT_CODE_MEANINGS, ExitCode

INVALID_SPEC = "InvalidSpec"
CHILD_CONFLICT = "ChildConflict"
JOBSET_REFUSED = "JobSetRefused"
CONFIGMAP_REFUSED = "ConfigMapRefused"
ADMITTED = "Admitted"


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


def slice_count(jobset: dict[str, Any]) -> int:
    return sum(rj.get("replicas", 1) for rj in jobset.get("spec", {}).get("replicatedJobs", []))


def queue_name(jobset: dict[str, Any]) -> Optional[str]:
    return (jobset.get("metadata", {}).get("labels") or {}).get(QUEUE_NAME_LABEL)


def admitted(jobset: dict[str, Any]) -> Optional[bool]:
    """Whether Kueue admitted a queued JobSet (it unsuspends exactly the admitted ones); None without Kueue."""
    if queue_name(jobset) is None:
        return None
    return not jobset.get("spec", {}).get("suspend")


def phase_of(jobset: dict[str, Any], suspend: bool) -> Phase:
    """The phase a JobSet stands for; `suspend` is the job's spec.suspend (the JobSet may lag behind it)."""
    for kind, phase in (("Completed", "Succeeded"), ("Failed", "Failed")):
        condition = _condition(jobset, kind)
        if condition is not None:
            return Phase(phase, condition.get("reason") or kind, condition.get("message") or "")
    kueue = admitted(jobset)
    if kueue is False:
        return Phase("Queued", "WaitingForAdmission",
                     f"waiting for Kueue to admit the workload (LocalQueue {queue_name(jobset)})")
    # Under Kueue an unsuspended JobSet is admitted, whatever its Suspended condition still says.
    if kueue is None and (suspend or jobset.get("spec", {}).get("suspend") or _condition(jobset, "Suspended")):
        return Phase("Suspended", "Suspended", "spec.suspend is true: the JobSet and its pods are suspended")
    status = jobset.get("status", {})
    replicated = {rj.get("name"): rj for rj in status.get("replicatedJobsStatus") or []}
    expected = {rj["name"]: rj.get("replicas", 1) for rj in jobset.get("spec", {}).get("replicatedJobs", [])}
    ready = sum(replicated.get(name, {}).get("ready", 0) for name in expected)
    total = slice_count(jobset)
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
                 restarts: Optional[int] = None, admitted: Optional[bool] = None) -> dict[str, Any]:
    """The phase fields to merge-patch for `new`; `current` is the resource's status now. Never `progress`."""
    patch: dict[str, Any] = {"phase": new.phase, "reason": new.reason, "message": new.message}
    if restarts is not None:
        patch["restarts"] = restarts
    if new.phase == "Running" and not current.get("startTime"):
        patch["startTime"] = now
    if new.phase in FINISHED_PHASES and not current.get("completionTime"):
        patch["completionTime"] = now
    patch["conditions"] = _conditions(current.get("conditions") or [], new, now, generation, admitted)
    return patch


def _conditions(conditions: list[dict[str, Any]], new: Phase, now: str, generation: Optional[int],
                admitted: Optional[bool]) -> list[dict[str, Any]]:
    """One condition per phase ever reached: the current one True, the others False since they were left; and
    Admitted for a job under Kueue."""
    by_type = {condition["type"]: dict(condition) for condition in conditions}
    for kind, condition in by_type.items():
        if kind in PHASES and kind != new.phase and condition["status"] == "True":
            condition.update(status="False", lastTransitionTime=now, observedGeneration=generation,
                             reason=new.reason, message=f"left {kind}: now {new.phase}")
    _set(by_type, new.phase, "True", new.reason, new.message, now, generation)
    if admitted is not None:
        _set(by_type, ADMITTED, "True" if admitted else "False",
             *(("Admitted", "Kueue admitted the workload and unsuspended the JobSet") if admitted else
               ("WaitingForAdmission", "the JobSet is suspended until Kueue admits the workload")), now, generation)
    return [by_type[kind] for kind in sorted(by_type)]


def _set(by_type: dict[str, dict[str, Any]], kind: str, status: str, reason: str, message: str, now: str,
         generation: Optional[int]) -> None:
    previous = by_type.get(kind)
    changed_at = previous["lastTransitionTime"] if previous and previous["status"] == status else now
    by_type[kind] = {"type": kind, "status": status, "reason": reason, "message": message,
                     "lastTransitionTime": changed_at, "observedGeneration": generation}


def is_transition(current: dict[str, Any], new: Phase) -> bool:
    return current.get("phase") != new.phase or current.get("reason") != new.reason


def event_type(phase: Phase) -> str:
    return "Warning" if phase.phase == "Failed" or phase.phase == "Restarting" else "Normal"


# JobSet names the Job that failed it ("... (first failed job: NAME)"); that Job's Failed condition, set by the pod
# failure policy, names the pod and its exit code ("Container worker for pod NS/POD failed with exit code 14 matching
# FailJob rule at index 0"). Neither message is an API field, hence the patterns; a mismatch only loses detail. A Job
# failed another way (backoffLimit, after a retryable exit) names neither: its pods' container states tell.
_FIRST_FAILED_JOB = re.compile(r"\(first failed job: ([a-z0-9.-]+)\)")
_FAILED_POD = re.compile(r"for pod [a-z0-9.-]+/([a-z0-9.-]+) failed with exit code (\d+)")


@dataclass(frozen=True)
class FailedHost:
    """The worker behind a failed Job: its exit code, and which host it was where its pod is still there."""

    exit_code: int
    pod: Optional[str] = None
    host: Optional[int] = None  # the pod's completion index: the host within its slice
    slice: Optional[int] = None  # the JobSet job index
    termination_reason: Optional[str] = None  # the kubelet's, e.g. OOMKilled


def first_failed_job(phase: Phase) -> Optional[str]:
    """The Job that a Failed JobSet names as the first to fail."""
    match = _FIRST_FAILED_JOB.search(phase.message) if phase.phase == "Failed" else None
    return match.group(1) if match else None


def _failure_policy_match(job: Optional[dict[str, Any]]) -> Optional[re.Match]:
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            match = _FAILED_POD.search(condition.get("message") or "")
            if match:
                return match
    return None


def _terminated(pod: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The worker container's terminated state, if it exited non-zero."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if container.get("name") == CONTAINER and terminated and terminated.get("exitCode"):
            return terminated
    return None


def _index(pod: dict[str, Any], key: str) -> Optional[int]:
    value = (pod["metadata"].get("annotations") or {}).get(key)
    return int(value) if value is not None and value.isdigit() else None


def failed_host(job: Optional[dict[str, Any]], pods: list[dict[str, Any]]) -> Optional[FailedHost]:
    """Which worker failed the batch/v1 Job `job` (`pods`: its pods), and with which exit code: the pod its pod
    failure policy names, else the first of its pods to exit non-zero. None if neither the Job nor a pod says."""
    match = _failure_policy_match(job)
    failed = sorted((pod for pod in pods if _terminated(pod) and (match is None or
                                                                   pod["metadata"]["name"] == match.group(1))),
                    key=lambda pod: (_terminated(pod).get("finishedAt") or "",
                                     _index(pod, COMPLETION_INDEX_ANNOTATION) or 0))
    if not failed:
        return FailedHost(int(match.group(2)), pod=match.group(1)) if match else None
    pod, terminated = failed[0], _terminated(failed[0])
    return FailedHost(int(match.group(2)) if match else terminated["exitCode"], pod=pod["metadata"]["name"],
                      host=_index(pod, COMPLETION_INDEX_ANNOTATION), slice=_index(pod, JOB_INDEX_ANNOTATION),
                      termination_reason=terminated.get("reason"))


def exit_code_meaning(code: int) -> str:
    try:
        return EXIT_CODE_MEANINGS[ExitCode(code)]
    except ValueError:
        return "not one of the worker's exit codes"


def with_failed_host(phase: Phase, failed: Optional[FailedHost], slices: int) -> Phase:
    """The phase with the worker that failed it added to its message: which host (and slice, for multislice),
    its pod, its exit code and what that means."""
    if failed is None:
        return phase
    who = "worker"
    if failed.host is not None:
        who = f"slice {failed.slice} host {failed.host}" if slices > 1 else f"host {failed.host}"
    if failed.pod is not None:
        who += f" (pod {failed.pod})"
    code = f"exited {failed.exit_code}"
    if failed.termination_reason not in (None, "Error"):
        code += f" ({failed.termination_reason})"
    return replace(phase, message=f"{who} {code}: {exit_code_meaning(failed.exit_code)}; {phase.message}")
