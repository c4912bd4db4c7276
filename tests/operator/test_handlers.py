"""The kopf handlers, run by kopf's own KopfRunner against an API server (see conftest.kubeconfig).

The test plays the user (creating and editing jobs) and the JobSet controller (writing JobSet status); the
operator does the rest through the API, exactly as in a cluster.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter

import kopf
import kubernetes
import pytest
from kopf.testing import KopfRunner

from operator_testkit import make_job, wait_for
from simpo_operator import render
from simpo_operator.handlers.creation_burst import CreationBurst
from simpo_operator.handlers.diff_base import ObservedGenerationDiffBase
from simpo_operator.handlers.reconcile import refusal
from simpo_operator.resource import PHASES, validate_job
from simpo_worker.contract.api import EXIT_CODE_MEANINGS, ExitCode, Progress
from simpo_worker.observe.progress import KubernetesStatusReporter

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def operator(namespace: str):
    args = ["run", "--standalone", "--namespace", namespace, "-m", "simpo_operator.handlers"]
    with KopfRunner(args, timeout=30) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


def phase_is(kube, name, phase, reason=None):
    def check():
        status = (kube.job(name) or {}).get("status") or {}
        return status if status.get("phase") == phase and (reason is None or status.get("reason") == reason) else None
    return wait_for(check, f"{name} phase {phase} {reason or ''}")


def ready(jobset, slices=1, restarts=0):
    return {"restarts": restarts, "replicatedJobsStatus": [
        {"name": render.REPLICATED_JOB, "ready": slices, "active": slices, "succeeded": 0, "failed": 0,
         "suspended": 0}]}


def condition(kind, reason, message=""):
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2030-01-01T00:00:00Z"}


def test_create_renders_owned_children_and_walks_every_transition_to_succeeded(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        job = kube.create_job(make_job("walk", hosts=3))
        status = phase_is(kube, "walk", "Pending", "WaitingForPods")
        jobset = kube.jobset("walk")
        [configmap] = [cm for cm in kube.configmaps() if cm["metadata"]["name"] == "walk-config"]
        for child in (jobset, configmap):
            [owner] = child["metadata"]["ownerReferences"]
            assert (owner["uid"], owner["kind"], owner["controller"]) == (job["metadata"]["uid"], "SimpoInterleaveJob",
                                                                           True)
        # What the operator created is exactly what `render` prints for this resource.
        expected = render.render_jobset(validate_job(kube.job("walk")))
        assert jobset["spec"] == expected["spec"]
        assert status["jobSetName"] == "walk" and status["hosts"] == 3 and status["outputDir"] == "/tmp/out"
        assert status["observedGeneration"] == 1
        # kopf's bookkeeping (ObservedGenerationDiffBase) wrote nothing to the job but that status.
        assert not kube.job("walk")["metadata"].get("annotations")

        kube.set_jobset_status("walk", ready(jobset))
        status = phase_is(kube, "walk", "Running", "AllHostsReady")
        started = status["startTime"]
        kube.set_jobset_status("walk", {"restarts": 1, "replicatedJobsStatus": [
            {"name": "worker", "ready": 0, "active": 1, "succeeded": 0, "failed": 0, "suspended": 0}]})
        status = phase_is(kube, "walk", "Restarting", "JobSetRestarted")
        assert status["restarts"] == 1
        kube.set_jobset_status("walk", ready(jobset, restarts=1))
        status = phase_is(kube, "walk", "Running")
        assert status["startTime"] == started, "startTime is the first start, not the latest"
        kube.set_jobset_status("walk", {"conditions": [condition("Completed", "AllJobsCompleted")]})
        status = phase_is(kube, "walk", "Succeeded", "AllJobsCompleted")
        assert status["completionTime"]
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions == {"Pending": "False", "Running": "False", "Restarting": "False", "Succeeded": "True"}
        # One event per transition (the API lists them in name order, so compare counts).
        events = wait_for(lambda: (lambda found: found if len(found) >= 5 else None)(
            [e for e in kube.events("walk") if e["reason"] in PHASES]), "transition events")
        assert Counter(e["reason"] for e in events) == {"Pending": 1, "Running": 2, "Restarting": 1, "Succeeded": 1}
        assert {e["type"] for e in events if e["reason"] == "Restarting"} == {"Warning"}
        # Terminal: later JobSet changes do not move it.
        kube.set_jobset_status("walk", {"conditions": [condition("Failed", "FailedJobs")]})
        time.sleep(1.0)
        assert kube.job("walk")["status"]["phase"] == "Succeeded"


def test_the_diff_base_is_the_observed_generation():
    storage = ObservedGenerationDiffBase()
    job = {**make_job("gen"), "metadata": {"name": "gen", "namespace": "jobs", "generation": 1}}
    assert storage.fetch(body=kopf.Body(job)) is None  # never reconciled: a creation
    job["status"] = {"observedGeneration": 1}
    assert storage.fetch(body=kopf.Body(job)) == storage.build(body=kopf.Body(job))  # nothing new
    job["metadata"]["generation"] = 2
    old, new = storage.fetch(body=kopf.Body(job)), storage.build(body=kopf.Body(job))
    assert old["spec"] != new["spec"]  # an update of spec


def test_held_back_writes_wait_for_a_quiet_moment_after_the_last_creation():
    creations = CreationBurst()
    with creations:
        pass
    start = time.monotonic()
    creations.wait_quiet(0.2, 2.0)
    assert 0.15 < time.monotonic() - start < 1.0
    with creations:  # a creation still running: the wait ends at its limit
        start = time.monotonic()
        creations.wait_quiet(0.2, 0.3)
        assert 0.25 < time.monotonic() - start < 1.0


def test_a_refused_child_fails_the_job_with_the_api_servers_words_and_anything_else_is_retried():
    refused = kubernetes.client.ApiException(status=422, reason="Unprocessable Entity")
    refused.body = json.dumps(
        {"message": 'ConfigMap "a-config" is invalid: []: Too long: must have at most 1048576 bytes'})
    phase = refusal(refused, "ConfigMap", "ConfigMapRefused")
    assert (phase.phase, phase.reason) == ("Failed", "ConfigMapRefused")
    assert phase.message == ('the API server refused the ConfigMap: ConfigMap "a-config" is invalid: []: Too long: '
                             'must have at most 1048576 bytes')
    unavailable = kubernetes.client.ApiException(status=503, reason="Service Unavailable")
    with pytest.raises(kubernetes.client.ApiException) as raised:
        refusal(unavailable, "ConfigMap", "ConfigMapRefused")
    assert raised.value is unavailable


def test_jobset_failure_reports_failed_with_the_jobset_reason(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("fails"))
        phase_is(kube, "fails", "Pending")
        kube.set_jobset_status("fails", {"restarts": 3, "conditions": [
            condition("Failed", "ReachedMaxRestarts", "jobset failed: reached max restarts")]})
        status = phase_is(kube, "fails", "Failed", "ReachedMaxRestarts")
        assert "max restarts" in status["message"] and status["completionTime"]
        assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in kube.events("fails"))


def worker_pod(name, host, code, controller_uid):
    """A worker pod of an Indexed Job as the Job controller labels it and the kubelet leaves it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"batch.kubernetes.io/controller-uid": controller_uid},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(host),
                                         "jobset.sigs.k8s.io/job-index": "0"}},
            "spec": {"containers": [{"name": "worker", "image": "w"}], "restartPolicy": "Never"},
            "status": {"phase": "Failed" if code else "Running", "containerStatuses": [
                {"name": "worker", "image": "w", "imageID": "", "ready": False, "restartCount": 0,
                 "state": {"terminated": {"exitCode": code, "reason": "Error", "finishedAt": "2030-01-01T00:00:05Z"}}
                 if code else {"running": {}}}]}}


def test_a_failure_policy_failure_names_the_host_its_exit_code_and_its_meaning(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("oom", hosts=2))
        phase_is(kube, "oom", "Pending")
        # What the Job controller writes when the pod failure policy's FailJob rule matches, the pods it selects
        # (another Job's failed pod too, which its selector leaves out), and what JobSet then says.
        kube.create_batch_job({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "oom-worker-0"},
                               "spec": {"selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "u0"}},
                                        "template": {"spec": {"containers": [{"name": "worker", "image": "w"}],
                                                              "restartPolicy": "Never"}}},
                               "status": {"conditions": [condition(
                                   "Failed", "PodFailurePolicy", "Container worker for pod jobs/oom-worker-0-1-x "
                                   "failed with exit code 14 matching FailJob rule at index 0")]}})
        for pod in (worker_pod("oom-worker-0-0-w", 0, None, "u0"), worker_pod("oom-worker-0-1-x", 1, 14, "u0"),
                    worker_pod("other-worker-0-0-z", 0, 11, "u-other")):
            kube.create_pod(pod)
        kube.set_jobset_status("oom", {"conditions": [condition(
            "Failed", "FailJobSetFailurePolicyAction",
            "applying FailJobSet failure policy action (first failed job: oom-worker-0)")]})
        status = phase_is(kube, "oom", "Failed", "FailJobSetFailurePolicyAction")
        assert status["message"] == (f"host 1 (pod oom-worker-0-1-x) exited 14: "
                                     f"{EXIT_CODE_MEANINGS[ExitCode.OUT_OF_MEMORY]}; applying FailJobSet failure "
                                     "policy action (first failed job: oom-worker-0)")
        event = wait_for(lambda: next((e for e in kube.events("oom") if e["reason"] == "Failed"), None),
                         "the Failed event")
        assert "host 1 (pod oom-worker-0-1-x) exited 14" in event["message"]


def test_suspend_and_resume_reach_the_jobset(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("pause", suspend=True))
        phase_is(kube, "pause", "Suspended")
        assert kube.jobset("pause")["spec"]["suspend"] is True
        kube.patch_job_spec("pause", {"suspend": False})
        wait_for(lambda: kube.jobset("pause")["spec"]["suspend"] is False, "JobSet resumed")
        phase_is(kube, "pause", "Pending")
        kube.set_jobset_status("pause", ready(kube.jobset("pause")))
        phase_is(kube, "pause", "Running")
        kube.patch_job_spec("pause", {"suspend": True})
        wait_for(lambda: kube.jobset("pause")["spec"]["suspend"] is True, "JobSet suspended")
        status = phase_is(kube, "pause", "Suspended")
        assert status["observedGeneration"] == 3


def test_under_kueue_the_operator_creates_the_jobset_suspended_and_never_touches_suspend_again(kube_client):
    """Kueue owns JobSet.spec.suspend of a queued job: it unsuspends to admit and suspends to preempt. The
    operator's reconciles (a spec edit, an operator restart) must leave whatever Kueue set."""
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("queued", queueName="tpu"))
        status = phase_is(kube, "queued", "Queued", "WaitingForAdmission")
        jobset = kube.jobset("queued")
        assert jobset["spec"]["suspend"] is True
        assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu"
        assert {c["type"]: c["status"] for c in status["conditions"]}["Admitted"] == "False"
        for kueue_sets in (False, True):  # admitted, then preempted
            kube.patch_jobset_spec("queued", {"suspend": kueue_sets})
            phase_is(kube, "queued", "Queued" if kueue_sets else "Pending")
            kube.patch_job_spec("queued", {"ttlSecondsAfterFinished": 100 + kueue_sets})  # a reconcile
            wait_for(lambda: (kube.job("queued").get("status") or {}).get("observedGeneration") == 2 + kueue_sets,
                     "the spec edit reconciled")
            assert kube.jobset("queued")["spec"]["suspend"] is kueue_sets
        kube.patch_jobset_spec("queued", {"suspend": False})
        status = phase_is(kube, "queued", "Pending")
        assert {c["type"]: c["status"] for c in status["conditions"]}["Admitted"] == "True"
    with operator(kube.namespace):  # the operator's restart reconciles every job (resume)
        kube.set_jobset_status("queued", ready(kube.jobset("queued")))
        phase_is(kube, "queued", "Running")
        assert kube.jobset("queued")["spec"]["suspend"] is False


def test_invalid_config_is_failed_without_children_and_a_fixed_spec_revives_it(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        bad = make_job("bad")
        bad["spec"]["config"]["trainer"]["batch_size"] = 6
        bad["spec"]["config"]["trainer"]["microbatches"] = 4
        kube.create_job(bad)
        status = phase_is(kube, "bad", "Failed", "InvalidSpec")
        assert status["message"] == ("spec.config.trainer.microbatches: must divide batch_size "
                                     "(batch_size = 6, microbatches = 4)")
        # A good job next to it is served: the bad one neither crashed nor blocked the operator.
        kube.create_job(make_job("good"))
        phase_is(kube, "good", "Pending")
        assert kube.jobset("bad") is None and "bad-config" not in [c["metadata"]["name"] for c in kube.configmaps()]
        # No loop: the failed resource stays still.
        version = kube.job("bad")["metadata"]["resourceVersion"]
        time.sleep(1.5)
        assert kube.job("bad")["metadata"]["resourceVersion"] == version
        kube.patch_job_spec("bad", {"config": {"trainer": {"microbatches": 2}}})
        phase_is(kube, "bad", "Pending")
        assert kube.jobset("bad") is not None


def test_bad_tpu_shape_names_the_field_and_the_valid_choices(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        job = make_job("shape")
        del job["spec"]["hosts"]
        job["spec"]["tpu"] = {"type": "v5p-48"}
        kube.create_job(job)
        status = phase_is(kube, "shape", "Failed", "InvalidSpec")
        assert status["message"].startswith("spec.tpu.type: unknown TPU type 'v5p-48'; valid types: ")
        assert "v5p-32" in status["message"]


def test_adopts_children_after_an_operator_restart_without_duplicates(kube_client):
    kube = kube_client
    # The operator died after creating the children but before recording anything: they exist, owned.
    job = kube.create_job(make_job("adopt"))
    for child in render.render_job(job):
        (kube.create_configmap if child["kind"] == "ConfigMap" else kube.create_jobset)(child)
    kube.set_jobset_status("adopt", ready(kube.jobset("adopt")))
    uid = kube.jobset("adopt")["metadata"]["uid"]
    with operator(kube.namespace):
        phase_is(kube, "adopt", "Running")
    # A second operator run (a restart) changes nothing.
    version = kube.job("adopt")["metadata"]["resourceVersion"]
    with operator(kube.namespace):
        time.sleep(2.0)
    assert [js["metadata"]["uid"] for js in kube.jobsets()] == [uid]
    assert len(kube.configmaps()) == 1
    assert kube.job("adopt")["status"]["phase"] == "Running"
    assert kube.job("adopt")["metadata"]["resourceVersion"] == version


def test_a_child_name_taken_by_another_object_is_a_conflict(kube_client):
    kube = kube_client
    foreign = render.render_jobset(validate_job(make_job("taken", namespace=kube.namespace)))
    kube.create_jobset(foreign)
    with operator(kube.namespace):
        kube.create_job(make_job("taken"))
        status = phase_is(kube, "taken", "Failed", "ChildConflict")
        assert "JobSet" in status["message"] and "not owned" in status["message"]
    assert len(kube.jobsets()) == 1


def test_worker_progress_reaches_the_status_and_is_never_overwritten(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("progress"))
        phase_is(kube, "progress", "Pending")
        # The worker leader's own reporter, as it runs in a pod (here with the test's server and token).
        reporter = KubernetesStatusReporter(kube.client.configuration.host, kube.namespace, "progress",
                                            token="test-token", ca_file=None)
        reporter.report(Progress(stage="infer", step=2, totalSteps=7, promptsDone=64, promptsTotal=128,
                                 tokens=131072))
        progress = {"stage": "infer", "step": 2, "totalSteps": 7, "promptsDone": 64, "promptsTotal": 128,
                    "tokens": 131072}
        reported = kube.job("progress")["status"]["progress"]
        assert reported.pop("updateTime").endswith("Z")  # the reporter stamps each update (RFC 3339, UTC)
        assert reported == progress
        kube.set_jobset_status("progress", ready(kube.jobset("progress")))
        status = phase_is(kube, "progress", "Running")
        assert status["progress"] == {**progress, "updateTime": status["progress"]["updateTime"]}
        # The last report of a run, and the operator's Succeeded next to it (kubectl's STAGE column shows done).
        reporter.report(Progress(stage="done", step=7, totalSteps=7))
        kube.set_jobset_status("progress", {"conditions": [condition("Completed", "AllJobsCompleted")]})
        status = phase_is(kube, "progress", "Succeeded")
        assert status["progress"] == {"stage": "done", "step": 7, "totalSteps": 7,
                                      "updateTime": status["progress"]["updateTime"]}


def test_ttl_deletes_a_finished_job_and_its_children(kube_client):
    kube = kube_client
    with operator(kube.namespace):
        kube.create_job(make_job("short", ttlSecondsAfterFinished=0))
        phase_is(kube, "short", "Pending")
        kube.set_jobset_status("short", {"conditions": [condition("Completed", "AllJobsCompleted")]})
        wait_for(lambda: kube.job("short") is None, "the finished job deleted")
        wait_for(lambda: kube.jobset("short") is None and not kube.configmaps(), "children garbage-collected")
