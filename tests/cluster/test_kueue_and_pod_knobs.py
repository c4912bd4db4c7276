"""Kueue and the scheduling/pod knobs on the real control plane: the real Kueue manager with its webhooks admits
the operator's JobSets against TPU quota, and every pod knob survives the API server, the JobSet webhook and the
JobSet and Job controllers onto the worker pods (kwok plays the nodes, as in test_operator_e2e.py).
"""
import threading

import kubernetes
import pytest
import yaml

from control_plane import ClusterError, wait_for
from operator_process import JOBS_NAMESPACE
from test_operator_e2e import condition_types, pods_of, reference_job, wait_phase

QUEUE = "tpu-v5p"
PRIORITY_CLASS = "simpo-test-low"
WORKLOAD_PRIORITY = "research-batch"
TEAM_TAINT = {"key": "example.com/team", "value": "research", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def kueue(cluster, operator):
    """Kueue's manager, and a ClusterQueue whose TPU quota is exactly one v5p-32 (4 hosts x 4 chips)."""
    cluster.start_kueue()
    cluster.apply([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "v5p"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
         "metadata": {"name": WORKLOAD_PRIORITY}, "value": 10},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "tpu"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["google.com/tpu"],
             "flavors": [{"name": "v5p", "resources": [{"name": "google.com/tpu", "nominalQuota": 16}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": JOBS_NAMESPACE}, "spec": {"clusterQueue": "tpu"}},
    ])
    wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                         cluster.get("clusterqueue", "tpu").get("status", {}).get("conditions", [])), 60,
             "the ClusterQueue to be active", tuple(cluster.processes.values()))
    yield cluster
    cluster.kubectl("delete", "localqueue", QUEUE, "-n", JOBS_NAMESPACE)
    cluster.kubectl("delete", "clusterqueue,resourceflavor,workloadpriorityclass", "--all")
    cluster.stop_kueue()


class SuspendWatch:
    """Every change of a JobSet's spec.suspend, with the field managers that own spec.suspend after it."""

    WINDOW_S = 5  # each watch request ends after this long and resumes from its resourceVersion, so stop is prompt

    def __init__(self, cluster):
        client = kubernetes.config.new_client_from_config(str(cluster.admin_kubeconfig))
        self.api = kubernetes.client.CustomObjectsApi(client)
        self.changes: dict[str, list[tuple[bool, set[str]]]] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SuspendWatch":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        self.thread.join(self.WINDOW_S * 6)
        if self.thread.is_alive():
            raise TimeoutError("the JobSet watch did not stop")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        watch, resource_version = kubernetes.watch.Watch(), None
        try:
            while not self.stopping.is_set():
                for event in watch.stream(self.api.list_namespaced_custom_object, "jobset.x-k8s.io", "v1alpha2",
                                          JOBS_NAMESPACE, "jobsets", timeout_seconds=self.WINDOW_S,
                                          resource_version=resource_version):
                    self._record(event["object"])
                resource_version = watch.resource_version
        except BaseException as error:  # the test thread raises it in __exit__
            self.error = error

    def _record(self, jobset: dict) -> None:
        history = self.changes.setdefault(jobset["metadata"]["name"], [])
        suspend = bool(jobset["spec"].get("suspend"))
        if not history or history[-1][0] != suspend:
            owners = {entry["manager"] for entry in jobset["metadata"].get("managedFields") or []
                      if "f:suspend" in (entry.get("fieldsV1") or {}).get("f:spec", {})}
            history.append((suspend, owners))


def test_kueue_admits_one_v5p32_at_a_time_and_only_kueue_flips_suspend(kueue, operator):
    cluster = kueue
    with SuspendWatch(cluster) as watch:
        first, second = (reference_job("run-8s", queueName=QUEUE, workloadPriorityClassName=WORKLOAD_PRIORITY)
                         for _ in range(2))
        cluster.apply(first)
        first_name, second_name = first["metadata"]["name"], second["metadata"]["name"]
        wait_phase(cluster, operator, first_name, ("Pending", "Running"))
        cluster.apply(second)
        queued = wait_phase(cluster, operator, second_name, ("Queued",))
        assert condition_types(queued)["Admitted"] == "False", queued["status"]
        assert queued["status"]["message"] == f"waiting for Kueue to admit the workload (LocalQueue {QUEUE})"
        [workload] = [w for w in cluster.get("workloads", "-n", JOBS_NAMESPACE)["items"]
                      if w["metadata"]["ownerReferences"][0]["name"] == second_name]
        assert "QuotaReserved" not in {c["type"] for c in workload["status"].get("conditions", [])
                                       if c["status"] == "True"}, workload["status"]
        assert workload["spec"]["priority"] == 10, workload["spec"]  # from the WorkloadPriorityClass label

        done = wait_phase(cluster, operator, first_name, ("Succeeded", "Failed"), timeout_s=180)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert condition_types(done)["Admitted"] == "True"
        # The second was queued the whole time the first held the quota, and is admitted after it.
        running = wait_phase(cluster, operator, second_name, ("Pending", "Running", "Succeeded"), timeout_s=120)
        assert condition_types(running)["Admitted"] == "True"
        assert condition_types(running)["Queued"] == "False"
        second_done = wait_phase(cluster, operator, second_name, ("Succeeded", "Failed"), timeout_s=180)
        assert second_done["status"]["phase"] == "Succeeded", second_done["status"]
        assert second_done["status"]["startTime"] >= done["status"]["completionTime"]
        for name in (first_name, second_name):
            assert len(pods_of(cluster, name)) == 4
            cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE, "--wait=false")
    # Created suspended by the operator, unsuspended once, by Kueue; nothing else ever changed it.
    for name in (first_name, second_name):
        history = watch.changes[name]
        assert [suspend for suspend, _ in history] == [True, False], history
        assert history[1][1] and all("kueue" in manager.lower() for manager in history[1][1]), history


# The two kinds of TPU capacity a job can ask for by name (spot VMs never consume reservations): its node labels.
CAPACITY_LABELS = {
    "spot": {"cloud.google.com/gke-spot": "true"},
    "reservation": {"cloud.google.com/reservation-name": "v5p-reservation",
                    "cloud.google.com/reservation-affinity": "specific"},
}
SPOT_TAINT = {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}


def pool_name(capacity: str) -> str:
    return f"v5p-32-{capacity}"


def knobs_job(capacity: str) -> dict:
    return reference_job(
        "run-2s", priorityClassName=PRIORITY_CLASS,
        scheduling={
            **({"spot": True} if capacity == "spot" else {"reservation": "v5p-reservation"}),
            "nodeSelector": {"example.com/pool-kind": "team-tpu"},
            "tolerations": [{"key": TEAM_TAINT["key"], "operator": "Equal", "value": TEAM_TAINT["value"],
                             "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "cloud.google.com/gke-nodepool", "operator": "In",
                                       "values": [pool_name(capacity)]}]}]}}}},
        pod={
            "labels": {"team": "research"}, "annotations": {"gke-gcsfuse/volumes": "true"},
            "imagePullSecrets": [{"name": "registry-credentials"}],
            "env": [{"name": "LIBTPU_INIT_ARGS", "value": "--xla_tpu_enable_data_parallel_all_reduce_opt=true"},
                    {"name": "XLA_FLAGS", "value": "--xla_dump_to=/tmp/xla"}],
            "envFrom": [{"secretRef": {"name": "hf-token"}}],
            "volumes": [{"name": "datasets", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
                                                     "volumeAttributes": {"bucketName": "bucket",
                                                                          "mountOptions": "implicit-dirs"}}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}],
            "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
            "hostNetwork": True})


@pytest.fixture
def capacity_pool(cluster, request):
    """A v5p-32 node pool of spot VMs or of a reservation (request.param), tainted for one team (so no other test's
    pods land there)."""
    kind = request.param
    nodes = []
    for host in range(4):
        name = f"{pool_name(kind)}-{host}"
        resources = {"cpu": "32", "memory": "128Gi", "pods": "110", "google.com/tpu": "4"}
        nodes.append({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": {
                "kubernetes.io/hostname": name, "type": "kwok", "cloud.google.com/gke-nodepool": pool_name(kind),
                "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice", "cloud.google.com/gke-tpu-topology": "2x2x4",
                **CAPACITY_LABELS[kind], "example.com/pool-kind": "team-tpu"}},
            "spec": {"taints": [{"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"},
                                *([SPOT_TAINT] if kind == "spot" else []), TEAM_TAINT]},
            "status": {"capacity": resources, "allocatable": resources}})
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(nodes))
    cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": PRIORITY_CLASS}, "value": 100})
    yield kind, [node["metadata"]["name"] for node in nodes]
    cluster.kubectl("delete", "node", *[node["metadata"]["name"] for node in nodes], "--wait=false")


@pytest.mark.parametrize("capacity_pool", ["spot", "reservation"], indirect=True)
def test_every_pod_knob_reaches_every_worker_pod(cluster, operator, capacity_pool):
    capacity, nodes = capacity_pool
    job = knobs_job(capacity)
    cluster.apply(job)
    name = job["metadata"]["name"]
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"), timeout_s=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    pods = pods_of(cluster, name)
    assert sorted(pod["spec"]["nodeName"] for pod in pods) == nodes
    for pod in pods:
        spec, [container] = pod["spec"], pod["spec"]["containers"]
        assert pod["metadata"]["labels"]["team"] == "research"
        assert pod["metadata"]["labels"]["simpo.dev/job"] == name
        assert pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
        assert spec["nodeSelector"] == {
            "example.com/pool-kind": "team-tpu", "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
            "cloud.google.com/gke-tpu-topology": "2x2x4", **CAPACITY_LABELS[capacity]}
        tolerations = [{k: t[k] for k in ("key", "operator", "value", "effect") if k in t}
                       for t in spec["tolerations"]]
        wanted = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"},
                  {"key": TEAM_TAINT["key"], "operator": "Equal", "value": "research", "effect": "NoSchedule"}]
        if capacity == "spot":
            wanted.append({**SPOT_TAINT, "operator": "Equal"})
        assert all(toleration in tolerations for toleration in wanted), tolerations
        assert any(t.get("key") == SPOT_TAINT["key"] for t in tolerations) == (capacity == "spot"), tolerations
        assert spec["affinity"] == job["spec"]["scheduling"]["affinity"]
        assert (spec["priorityClassName"], spec["priority"]) == (PRIORITY_CLASS, 100)
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert (spec["hostNetwork"], spec["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LIBTPU_INIT_ARGS"] == "--xla_tpu_enable_data_parallel_all_reduce_opt=true"
        assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/xla" and env["SIMPO_LOG_FORMAT"] == "json"
        assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["datasets"]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert (mounts["/data"], mounts["/dev/shm"], mounts["/etc/simpo"]) == ("datasets", "dshm", "config")
    cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE, "--wait=false")


@pytest.mark.parametrize("spec, message", [
    ({"scheduling": {"nodeSelector": {"cloud.google.com/gke-tpu-topology": "2x2x2"}}},
     "the TPU accelerator/topology labels come from spec.tpu"),
    ({"pod": {"env": [{"name": "SIMPO_CONFIG", "value": "/x"}]}}, "the operator sets SIMPO_CONFIG"),
    ({"pod": {"labels": {"jobset.sigs.k8s.io/jobset-name": "x"}}}, "labels the operator, JobSet"),
    ({"queueName": QUEUE, "suspend": True}, "spec.suspend cannot be true with spec.queueName"),
    ({"scheduling": {"spot": True, "reservation": "v5p-reservation"}}, "set `spot` or `reservation`, not both"),
])
def test_the_api_server_refuses_a_knob_that_would_displace_the_operators_own(cluster, chart, spec, message):
    """The CRD's CEL rules (generated from the same Rules validate_job checks) compile and refuse at admission."""
    with pytest.raises(ClusterError, match=message.replace(".", r"\.")):
        cluster.apply(reference_job("run-1s", **spec))


def test_a_jobset_the_api_server_refuses_fails_the_job_with_its_message(cluster, operator):
    job = reference_job("run-1s", pod={"volumes": [{"name": "dshm", "emptyDir": {"sizeLimit": "lots"}}]})
    cluster.apply(job)
    failed = wait_phase(cluster, operator, job["metadata"]["name"], ("Failed",))
    assert failed["status"]["reason"] == "JobSetRefused", failed["status"]
    # JobSet's webhook decodes the pod template first: its words, passed on.
    assert failed["status"]["message"].startswith(
        'the API server refused the JobSet: admission webhook "mjobset.kb.io" denied the request: quantities must '
        'match the regular expression'), failed["status"]


def test_kueue_has_its_own_cache_key_and_a_missing_build_is_an_error(monkeypatch, tmp_path):
    """Moving Kueue's pin rebuilds Kueue only: the six other programs keep their (CI-cached) directory."""
    import build_control_plane

    before = (build_control_plane.bin_dir(), build_control_plane.kueue_dir())
    monkeypatch.setattr(build_control_plane, "kueue_pin", lambda: "v0.16.0")
    assert build_control_plane.bin_dir() == before[0]
    assert build_control_plane.kueue_dir() != before[1] and build_control_plane.kueue_dir().parent == before[0].parent
    monkeypatch.setenv("SIMPO_CONTROL_PLANE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"Kueue missing from .*\['kueue', 'kueue-crds', 'kueue-webhooks.yaml'\]\. "
                                           r"Build it first: make control-plane"):
        build_control_plane.built_kueue_dir()
