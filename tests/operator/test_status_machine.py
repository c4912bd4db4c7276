"""The JobSet -> phase state machine and the status patch, as pure functions."""

import pytest

from simpo_operator import status as state
from simpo_worker.api import EXIT_CODE_MEANINGS, ExitCode


def jobset(replicas=1, ready=0, restarts=0, suspend=False, conditions=()):
    return {"spec": {"suspend": suspend, "replicatedJobs": [{"name": "worker", "replicas": replicas}]},
            "status": {"restarts": restarts, "conditions": list(conditions),
                       "replicatedJobsStatus": [{"name": "worker", "ready": ready}]}}


def true(kind, reason="R", message="m"):
    return {"type": kind, "status": "True", "reason": reason, "message": message}


@pytest.mark.parametrize("js, suspend, expected", [
    ({"spec": {"replicatedJobs": [{"name": "worker", "replicas": 2}]}}, False, ("Pending", "WaitingForPods")),
    (jobset(replicas=2, ready=1), False, ("Pending", "WaitingForPods")),
    (jobset(replicas=2, ready=2), False, ("Running", "AllHostsReady")),
    (jobset(replicas=2, ready=1, restarts=1), False, ("Restarting", "JobSetRestarted")),
    (jobset(replicas=2, ready=2, restarts=1), False, ("Running", "AllHostsReady")),
    (jobset(ready=1), True, ("Suspended", "Suspended")),
    (jobset(suspend=True), False, ("Suspended", "Suspended")),
    (jobset(conditions=[true("Suspended")]), False, ("Suspended", "Suspended")),
    (jobset(conditions=[true("Completed", "AllJobsCompleted")]), False, ("Succeeded", "AllJobsCompleted")),
    (jobset(conditions=[true("Failed", "FailedJobs")], restarts=2), False, ("Failed", "FailedJobs")),
    # A finished JobSet is finished even if the job was suspended afterwards.
    (jobset(conditions=[true("Completed", "AllJobsCompleted")]), True, ("Succeeded", "AllJobsCompleted")),
    (jobset(conditions=[{**true("Failed"), "status": "False"}], ready=1), False, ("Running", "AllHostsReady")),
])
def test_phase_of(js, suspend, expected):
    phase = state.phase_of(js, suspend)
    assert (phase.phase, phase.reason) == expected


def test_failed_message_comes_from_the_jobset():
    phase = state.phase_of(jobset(conditions=[true("Failed", "ReachedMaxRestarts", "reached max restarts")]), False)
    assert phase == state.Phase("Failed", "ReachedMaxRestarts", "reached max restarts")


def test_a_failure_policy_failure_names_the_exit_code_and_what_it_means():
    failed = state.phase_of(jobset(conditions=[true(
        "Failed", "FailJobSetFailurePolicyAction",
        "applying FailJobSet failure policy action (first failed job: m11-worker-0)")]), False)
    assert state.first_failed_job(failed) == "m11-worker-0"
    job = {"status": {"conditions": [true("Failed", "PodFailurePolicy", "Container worker for pod ns/m11-worker-0-0-x "
                                                                        "failed with exit code 14 matching FailJob "
                                                                        "rule at index 0")]}}
    code = state.failed_exit_code(job)
    assert code == ExitCode.OUT_OF_MEMORY
    explained = state.with_exit_code(failed, code)
    assert explained.message == (f"worker exit code 14: {EXIT_CODE_MEANINGS[ExitCode.OUT_OF_MEMORY]}; "
                                 f"{failed.message}")
    assert "out of device memory" in explained.message
    # Without a readable code (a Job failed another way, or gone) the JobSet's own message stands.
    assert state.with_exit_code(failed, state.failed_exit_code(None)) == failed
    assert state.failed_exit_code({"status": {"conditions": [true("Failed", "BackoffLimitExceeded")]}}) is None
    assert state.first_failed_job(state.Phase("Running", "AllHostsReady", "")) is None
    assert "not one of the worker's exit codes" in state.with_exit_code(failed, 99).message


def test_status_patch_times_and_conditions():
    running = state.Phase("Running", "AllHostsReady", "ok")
    first = state.status_patch({}, running, now="t1", generation=1, restarts=0)
    assert first["startTime"] == "t1" and "completionTime" not in first and "progress" not in first
    current = {**first}
    # Same phase again: its condition keeps its transition time.
    again = state.status_patch(current, running, now="t2", generation=1, restarts=0)
    assert "startTime" not in again
    assert again["conditions"] == [{"type": "Running", "status": "True", "reason": "AllHostsReady", "message": "ok",
                                    "lastTransitionTime": "t1", "observedGeneration": 1}]
    done = state.status_patch(current, state.Phase("Succeeded", "AllJobsCompleted", ""), now="t3", generation=2)
    assert done["completionTime"] == "t3"
    by_type = {c["type"]: c for c in done["conditions"]}
    assert by_type["Running"]["status"] == "False" and by_type["Running"]["lastTransitionTime"] == "t3"
    assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["observedGeneration"] == 2


def test_final_phases():
    assert state.is_final({"phase": "Succeeded"}) and state.is_final({"phase": "Failed", "reason": "FailedJobs"})
    assert not state.is_final({"phase": "Failed", "reason": state.INVALID_SPEC})
    assert not state.is_final({"phase": "Running"}) and not state.is_final({})


def test_event_types():
    assert state.event_type(state.Phase("Failed", "x", "")) == "Warning"
    assert state.event_type(state.Phase("Restarting", "x", "")) == "Warning"
    assert state.event_type(state.Phase("Running", "x", "")) == "Normal"
