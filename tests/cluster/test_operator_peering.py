"""Two operator replicas with kopf peering (the chart's default): the active one is SIGKILLed in the middle of a
burst of jobs, the standby takes over, and every job converges with exactly the JobSet it should have."""
import signal
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control_plane import wait_for
from operator_process import REPO, OperatorProcess
from simpo_operator import peering

BURST = 30
JOB_LABEL = "simpo.dev/job"


def small_job(name: str, namespace: str) -> dict:
    job = yaml.safe_load((REPO / "manifests/examples/small-cpu.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": namespace}
    job["spec"].update(image="simpo-interleave/fake-worker:run-1s", hosts=1, resources={})
    job["spec"].pop("ttlSecondsAfterFinished", None)
    return job


def metric(operator: OperatorProcess, name: str) -> float:
    """The sum of a metric's samples (all labels) on one replica."""
    return sum(sample.value for family in text_string_to_metric_families(operator.metrics())
               for sample in family.samples if sample.name == name)


@pytest.mark.timeout(600)
def test_standby_takes_over_when_the_active_replica_is_killed_mid_burst(cluster, chart, namespace):
    # Replicas of their own, serving a namespace of their own (the session's operator serves simpo-jobs).
    cluster.kubectl("create", "serviceaccount", "simpo-worker", "-n", namespace)
    env = {"SIMPO_WATCH_NAMESPACES": namespace}
    first = OperatorProcess(cluster, "operator-a", env).start()
    second = None
    try:
        wait_for(lambda: first.readiness() == (200, {"ready": True, "role": "active", "peering":
                                                      "simpo-interleave-operator", "identity": "operator-a"}),
                 60, "the first replica to be ready and active", (first.process,))
        second = OperatorProcess(cluster, "operator-b", env).start()
        # The younger replica stands by, and is ready: a rolling update waits for it.
        wait_for(lambda: second.readiness() == (200, {"ready": True, "role": "standby", "peering":
                                                       "simpo-interleave-operator", "identity": "operator-b"}),
                 60, "the second replica to be ready as the standby", (second.process,))
        assert metric(first, "simpo_operator_active") == 1 and metric(second, "simpo_operator_active") == 0

        names = [f"burst-{i:02d}" for i in range(BURST)]
        cluster.apply([small_job(name, namespace) for name in names])  # one request after the other, at once

        def jobset_count() -> int:
            return len(cluster.get("jobsets", "-n", namespace)["items"])
        wait_for(lambda: jobset_count() >= 5, 120, "the active replica to create some JobSets",
                 (first.process, second.process), interval_s=0.1)
        first.process.popen.send_signal(signal.SIGKILL)
        first.process.popen.wait(10)
        killed_at, at_kill = time.monotonic(), jobset_count()

        wait_for(lambda: second.readiness()[1].get("role") == "active", 60, "the standby to take over",
                 (second.process,), interval_s=0.2)
        takeover_s = time.monotonic() - killed_at
        print(f"\nkilled the active replica with {at_kill}/{BURST} JobSets created; the standby was active "
              f"{takeover_s:.1f}s later (peer record lifetime {peering.LIFETIME_S}s)")
        # The dead replica's record expires LIFETIME_S after its last keepalive (1 s apart); the rest is the
        # standby's peering watch and this poll, on a loaded machine.
        assert takeover_s < peering.LIFETIME_S + 10

        jobs = {}

        def all_succeeded() -> bool:
            items = cluster.get("sij", "-n", namespace)["items"]
            jobs.update({item["metadata"]["name"]: item for item in items})
            return len(items) == BURST and all(i.get("status", {}).get("phase") == "Succeeded" for i in items)
        wait_for(all_succeeded, 300, f"all {BURST} jobs to succeed", (second.process,), interval_s=1)

        jobsets = cluster.get("jobsets", "-n", namespace)["items"]
        configmaps = [c for c in cluster.get("configmaps", "-n", namespace)["items"]
                      if JOB_LABEL in c["metadata"].get("labels", {})]
        # One JobSet and one ConfigMap per job, each controlled by that job (its uid): nothing duplicated,
        # nothing orphaned, nothing adopted from another job.
        for children in (jobsets, configmaps):
            owners = sorted((c["metadata"]["labels"][JOB_LABEL], ref["uid"]) for c in children
                            for ref in c["metadata"]["ownerReferences"] if ref.get("controller"))
            assert owners == sorted((name, jobs[name]["metadata"]["uid"]) for name in names)
        assert sorted(j["metadata"]["name"] for j in jobsets) == names
        for name in names:
            status = jobs[name]["status"]
            assert status["jobSetName"] == name and status["restarts"] == 0, status
            assert status["completionTime"] and status["phase"] == "Succeeded"
        # The survivor adopted what the killed one had created without an error storm: no handler failed.
        assert metric(second, "simpo_operator_handler_errors_total") == 0
        assert metric(second, "simpo_operator_active") == 1
    finally:
        for replica in (first, second):
            if replica is not None:
                replica.stop()
