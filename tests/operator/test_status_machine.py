"""The JobSet -> phase state machine and the status patch, as pure functions."""

import pytest

from simpo_operator import status as state
from simpo_worker.contract.api import EXIT_CODE_MEANINGS, ExitCode


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


def queued(js, queue="tpu"):
    return {**js, "metadata": {"labels": {"kueue.x-k8s.io/queue-name": queue}}}


@pytest.mark.parametrize("js, expected, admitted", [
    (jobset(), ("Pending", "WaitingForPods"), None),
    (queued(jobset(suspend=True)), ("Queued", "WaitingForAdmission"), False),
    # Admitted: Kueue unsuspended it (the JobSet's Suspended condition may still lag behind).
    (queued(jobset(conditions=[true("Suspended")])), ("Pending", "WaitingForPods"), True),
    (queued(jobset(ready=1)), ("Running", "AllHostsReady"), True),
    # Preempted by Kueue: suspended again, so queued again.
    (queued(jobset(suspend=True, restarts=1)), ("Queued", "WaitingForAdmission"), False),
    (queued(jobset(conditions=[true("Completed", "AllJobsCompleted")])), ("Succeeded", "AllJobsCompleted"), True),
])
def test_kueue_admission_is_the_jobsets_suspend_state(js, expected, admitted):
    phase = state.phase_of(js, False)
    assert (phase.phase, phase.reason) == expected
    assert state.admitted(js) is admitted


def test_admitted_condition_follows_kueue_and_is_not_a_phase():
    queued_patch = state.status_patch({}, state.Phase("Queued", "WaitingForAdmission", "m"), now="t0",
                                      generation=1, admitted=False)
    conditions = {c["type"]: c for c in queued_patch["conditions"]}
    assert (conditions["Queued"]["status"], conditions["Admitted"]["status"]) == ("True", "False")
    running = state.status_patch(queued_patch, state.Phase("Pending", "WaitingForPods", "m"), now="t1",
                                 generation=1, admitted=True)
    conditions = {c["type"]: c for c in running["conditions"]}
    assert (conditions["Queued"]["status"], conditions["Pending"]["status"]) == ("False", "True")
    assert conditions["Admitted"] == {"type": "Admitted", "status": "True", "reason": "Admitted",
                                      "message": "Kueue admitted the workload and unsuspended the JobSet",
                                      "lastTransitionTime": "t1", "observedGeneration": 1}
    # Another phase change keeps Admitted True since t1 (it is not flipped like a left phase).
    later = state.status_patch(running, state.Phase("Running", "AllHostsReady", "m"), now="t2", generation=1,
                               admitted=True)
    assert {c["type"]: c for c in later["conditions"]}["Admitted"]["lastTransitionTime"] == "t1"
    assert "Admitted" not in {c["type"] for c in state.status_patch({}, state.Phase("Pending", "W", "m"),
                                                                     now="t0", generation=1)["conditions"]}


def test_failed_message_comes_from_the_jobset():
    phase = state.phase_of(jobset(conditions=[true("Failed", "ReachedMaxRestarts", "reached max restarts")]), False)
    assert phase == state.Phase("Failed", "ReachedMaxRestarts", "reached max restarts")


def pod(name, host, code, finished="2030-01-01T00:00:05Z", slice_index=0, reason="Error"):
    """A worker pod as the Job controller and the kubelet leave it (code None: still running)."""
    state_ = ({"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}} if code is not None
              else {"running": {}})
    return {"metadata": {"name": name, "annotations": {"batch.kubernetes.io/job-completion-index": str(host),
                                                        "jobset.sigs.k8s.io/job-index": str(slice_index)}},
            "status": {"containerStatuses": [{"name": "worker", "state": state_}]}}


FAIL_JOB = {"status": {"conditions": [true("Failed", "PodFailurePolicy", "Container worker for pod ns/m11-worker-0-3-x "
                                                                         "failed with exit code 14 matching FailJob "
                                                                         "rule at index 0")]}}


def test_a_failure_policy_failure_names_the_host_its_exit_code_and_what_it_means():
    failed = state.phase_of(jobset(conditions=[true(
        "Failed", "FailJobSetFailurePolicyAction",
        "applying FailJobSet failure policy action (first failed job: m11-worker-0)")]), False)
    assert state.first_failed_job(failed) == "m11-worker-0"
    # Another host failed earlier, but the pod failure policy names the one that failed the Job.
    pods = [pod("m11-worker-0-0-a", 0, 0), pod("m11-worker-0-1-b", 1, 1, finished="2030-01-01T00:00:01Z"),
            pod("m11-worker-0-2-c", 2, None), pod("m11-worker-0-3-x", 3, 14)]
    host = state.failed_host(FAIL_JOB, pods)
    assert host == state.FailedHost(14, pod="m11-worker-0-3-x", host=3, slice=0, termination_reason="Error")
    explained = state.with_failed_host(failed, host, slices=1)
    assert explained.message == (f"host 3 (pod m11-worker-0-3-x) exited 14: "
                                 f"{EXIT_CODE_MEANINGS[ExitCode.OUT_OF_MEMORY]}; {failed.message}")
    assert "out of device memory" in explained.message


def test_multislice_names_the_slice_of_the_failed_host():
    failed = state.Phase("Failed", "FailJobSetFailurePolicyAction", "(first failed job: m11-worker-1)")
    job = {"status": {"conditions": [true("Failed", "PodFailurePolicy", "Container worker for pod ns/m11-worker-1-2-y "
                                                                        "failed with exit code 11 matching FailJob "
                                                                        "rule at index 0")]}}
    host = state.failed_host(job, [pod("m11-worker-1-2-y", 2, 11, slice_index=1)])
    assert state.with_failed_host(failed, host, slices=2).message.startswith(
        f"slice 1 host 2 (pod m11-worker-1-2-y) exited 11: {EXIT_CODE_MEANINGS[ExitCode.BAD_DATA]}; ")


def test_a_job_failed_by_its_backoff_limit_names_the_first_pod_to_fail():
    # After retryable exits (maxRestarts used up) the Job's condition names no pod: its pods' states tell.
    failed = state.Phase("Failed", "ReachedMaxRestarts", "jobset failed due to reaching max number of restarts "
                                                         "(first failed job: m11-worker-0)")
    job = {"status": {"conditions": [true("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff "
                                                                            "limit")]}}
    pods = [pod("m11-worker-0-0-a", 0, 1, finished="2030-01-01T00:00:09Z"),
            pod("m11-worker-0-1-b", 1, 137, finished="2030-01-01T00:00:02Z", reason="OOMKilled"),
            pod("m11-worker-0-2-c", 2, 0, finished="2030-01-01T00:00:01Z")]
    message = state.with_failed_host(failed, state.failed_host(job, pods), slices=1).message
    assert message == ("host 1 (pod m11-worker-0-1-b) exited 137 (OOMKilled): not one of the worker's exit codes; "
                       f"{failed.message}")


def test_without_its_pods_the_job_still_gives_the_pod_and_exit_code():
    failed = state.Phase("Failed", "FailJobSetFailurePolicyAction", "(first failed job: m11-worker-0)")
    host = state.failed_host(FAIL_JOB, [])
    assert host == state.FailedHost(14, pod="m11-worker-0-3-x")
    assert state.with_failed_host(failed, host, slices=1).message.startswith(
        f"worker (pod m11-worker-0-3-x) exited 14: {EXIT_CODE_MEANINGS[ExitCode.OUT_OF_MEMORY]}; ")
    # Neither the Job (gone, or failed another way) nor a pod says: the JobSet's own message stands.
    assert state.failed_host(None, []) is None
    assert state.failed_host({"status": {"conditions": [true("Failed", "BackoffLimitExceeded")]}},
                             [pod("m11-worker-0-0-a", 0, 0)]) is None
    assert state.with_failed_host(failed, None, slices=1) == failed
    assert state.first_failed_job(state.Phase("Running", "AllHostsReady", "")) is None


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
