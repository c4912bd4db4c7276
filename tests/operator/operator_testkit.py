"""Helpers shared by the operator tests: example jobs, the test's own Kubernetes client, polling."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import kubernetes

from simpo_operator import kube
from simpo_worker.contract.api import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
REFERENCE_JOB = EXAMPLES / "reference-m11-v5p-32.yaml"

TINY_CONFIG = {
    "model": {"source": "smollm2"},
    "data": {"train_files": ["/data/prefs.jsonl"]},
    "trainer": {"num_train_steps": 3, "batch_size": 4},
    "inference": {"eval_at_steps": [1], "synthetic_prompt_count": 4, "max_new_tokens": 8},
    "output_dir": "/tmp/out",
}


def make_job(name: str = "tiny", namespace: str = "jobs", **spec: Any) -> dict[str, Any]:
    """A valid SimpoInterleaveJob; keyword arguments replace spec fields."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SimpoInterleaveJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "simpo-worker:test", "hosts": 2, "config": copy.deepcopy(TINY_CONFIG), **spec},
    }


class Kube:
    """The test's own client: what a user (or the JobSet controller) does to the cluster."""

    def __init__(self, kubeconfig: Path, namespace: str):
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        self.client = kubernetes.client.ApiClient(configuration)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.namespace = namespace

    def create_job(self, job: dict[str, Any]) -> dict[str, Any]:
        job = copy.deepcopy(job)
        job["metadata"]["namespace"] = self.namespace
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)

    def job(self, name: str) -> dict[str, Any] | None:
        return self._get(GROUP, VERSION, PLURAL, name)

    def jobset(self, name: str) -> dict[str, Any] | None:
        return self._get(kube.JOBSET_GROUP, kube.JOBSET_VERSION, kube.JOBSET_PLURAL, name)

    def jobsets(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(kube.JOBSET_GROUP, kube.JOBSET_VERSION, self.namespace,
                                                         kube.JOBSET_PLURAL)["items"]

    def configmaps(self) -> list[dict[str, Any]]:
        return self.client.sanitize_for_serialization(self.core.list_namespaced_config_map(self.namespace))["items"]

    def _get(self, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(group, version, self.namespace, plural, name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_job_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec},
                                                   _content_type=kube.MERGE_PATCH)

    def patch_job_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name,
                                                          {"status": status}, _content_type=kube.MERGE_PATCH)

    def set_jobset_status(self, name: str, status: dict[str, Any]) -> None:
        """Play the JobSet controller: write the JobSet's status."""
        self.custom.patch_namespaced_custom_object_status(
            kube.JOBSET_GROUP, kube.JOBSET_VERSION, self.namespace, kube.JOBSET_PLURAL, name, {"status": status},
            _content_type=kube.MERGE_PATCH)

    def patch_jobset_spec(self, name: str, spec: dict[str, Any]) -> None:
        """Play Kueue: suspend or unsuspend a queued JobSet."""
        self.custom.patch_namespaced_custom_object(kube.JOBSET_GROUP, kube.JOBSET_VERSION, self.namespace,
                                                   kube.JOBSET_PLURAL, name, {"spec": spec},
                                                   _content_type=kube.MERGE_PATCH)

    def create_jobset(self, jobset: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(kube.JOBSET_GROUP, kube.JOBSET_VERSION, self.namespace,
                                                           kube.JOBSET_PLURAL, jobset)

    def create_batch_job(self, job: dict[str, Any]) -> None:
        """Play the JobSet and Job controllers: one of a JobSet's batch/v1 Jobs, then its status (which a create
        ignores)."""
        batch = kubernetes.client.BatchV1Api(self.client)
        batch.create_namespaced_job(self.namespace, {**job, "status": None})
        batch.patch_namespaced_job_status(job["metadata"]["name"], self.namespace, {"status": job["status"]},
                                          _content_type=kube.MERGE_PATCH)

    def create_pod(self, pod: dict[str, Any]) -> None:
        """Play the Job controller and the kubelet: a pod of a Job, then its status (which a create ignores)."""
        self.core.create_namespaced_pod(self.namespace, {**pod, "status": None})
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.namespace, {"status": pod["status"]},
                                             _content_type=kube.MERGE_PATCH)

    def create_configmap(self, configmap: dict[str, Any]) -> None:
        self.core.create_namespaced_config_map(self.namespace, configmap)

    def events(self, name: str) -> list[dict[str, Any]]:
        events = self.client.sanitize_for_serialization(self.core.list_namespaced_event(self.namespace))["items"]
        return [event for event in events if event["involvedObject"]["name"] == name]


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """Poll until `condition()` is truthy; fail naming `what` (with the last value seen) otherwise."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {value!r}")
