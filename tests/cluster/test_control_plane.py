"""The cluster tier's own parts, without the operator: apiserver + RBAC, fake TPU nodes, JobSet + webhooks, kwok."""
import json

import yaml

from control_plane import wait_for

FAKE_WORKER = "simpo-interleave/fake-worker"


def tpu_jobset(name: str, image: str, *, hosts: int = 2, accelerator: str = "tpu-v5p-slice",
               topology: str = "2x2x2", chips: int = 4, max_restarts: int = 0) -> dict:
    """A JobSet shaped like one TPU slice: one Indexed Job, a pod per host, each taking all chips of its node."""
    pod = {"restartPolicy": "Never",
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": accelerator,
                            "cloud.google.com/gke-tpu-topology": topology},
           "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
           "containers": [{"name": "worker", "image": image,
                           "resources": {"limits": {"google.com/tpu": str(chips)}}}]}
    job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
           "template": {"spec": pod}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": name},
            "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                     "replicatedJobs": [{"name": "slice", "replicas": 1, "template": {"spec": job}}]}}


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind and
                 c["status"] == "True"), None)


def wait_jobset_condition(cluster, namespace: str, name: str, kind: str, timeout_s: float = 90) -> dict:
    return wait_for(lambda: condition(cluster.get("jobset", name, "-n", namespace), kind) and
                    cluster.get("jobset", name, "-n", namespace),
                    timeout_s, f"JobSet {namespace}/{name} condition {kind}", tuple(cluster.processes.values()))


def test_rbac_is_enforced(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    as_nobody = cluster.token_kubeconfig("nobody", namespace)
    denied = cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig_path=as_nobody, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr
    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig_path=as_nobody).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:nobody"


def test_fake_tpu_nodes_look_like_gke_node_pools(cluster):
    nodes = {n["metadata"]["name"]: n for n in cluster.get("nodes")["items"]}
    shapes = set()
    for pool in cluster.pools:
        for host in range(pool.hosts):
            node = nodes[f"{pool.name}-{host}"]
            labels = node["metadata"]["labels"]
            assert labels["cloud.google.com/gke-nodepool"] == pool.name
            if pool.accelerator:
                shapes.add((labels["cloud.google.com/gke-tpu-accelerator"], labels["cloud.google.com/gke-tpu-topology"]))
                assert node["status"]["allocatable"]["google.com/tpu"] == str(pool.chips_per_host)
                assert {"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert len(shapes) >= 2


def test_jobset_webhook_defaults_and_rejects(cluster, namespace):
    cluster.apply(tpu_jobset("defaults", f"{FAKE_WORKER}:run-60s"), namespace)
    created = cluster.get("jobset", "defaults", "-n", namespace)
    # Set by JobSet's mutating webhook, not by us.
    assert created["spec"]["successPolicy"]["operator"] == "All"
    assert created["spec"]["network"]["enableDNSHostnames"] is True

    bad = tpu_jobset("bad", FAKE_WORKER)
    bad["spec"]["replicatedJobs"][0]["name"] = "x" * 70  # too long for the Job names JobSet derives from it
    rejected = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert rejected.returncode != 0
    # JobSet's validating webhook says so (the CRD schema has no such rule).
    assert "job names generated for this JobSet will exceed 63 characters" in rejected.stderr


def test_jobset_runs_to_completion_on_matching_tpu_nodes(cluster, namespace):
    cluster.apply(tpu_jobset("ok", FAKE_WORKER, accelerator="tpu-v6e-slice", topology="4x4", hosts=4), namespace)
    wait_jobset_condition(cluster, namespace, "ok", "Completed")
    pods = cluster.get("pods", "-n", namespace, "-l", "jobset.sigs.k8s.io/jobset-name=ok")["items"]
    assert len(pods) == 4
    assert {p["spec"]["nodeName"] for p in pods} == {f"v6e-16-{i}" for i in range(4)}
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)


def test_kwok_exit_code_stages_drive_jobset_restarts(cluster, namespace):
    # Fails with 42 on the first attempt only: one JobSet restart, then success.
    cluster.apply(tpu_jobset("flaky", f"{FAKE_WORKER}:exit-42-until-attempt-1", max_restarts=2), namespace)
    done = wait_jobset_condition(cluster, namespace, "flaky", "Completed")
    assert done["status"]["restarts"] == 1
    # Fails with 42 every time: the restart budget runs out.
    cluster.apply(tpu_jobset("broken", f"{FAKE_WORKER}:exit-42", max_restarts=1), namespace)
    failed = wait_jobset_condition(cluster, namespace, "broken", "Failed")
    assert failed["status"]["restarts"] == 1
    codes = {s["state"]["terminated"]["exitCode"]
             for p in cluster.get("pods", "-n", namespace, "-l", "jobset.sigs.k8s.io/jobset-name=broken")["items"]
             for s in p["status"].get("containerStatuses", []) if "terminated" in s["state"]}
    assert codes == {42}
