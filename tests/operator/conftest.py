"""Fixtures for the operator tests: example jobs, and for the handler tests an API server plus kopf's runner."""

from __future__ import annotations

import os
import tempfile

# The kubernetes client reads $KUBECONFIG once, when first imported (kopf's login uses that default): point it at
# the test API server's kubeconfig before anything imports it.
KUBECONFIG = os.environ.get("SIMPO_TEST_KUBECONFIG") or os.path.join(tempfile.mkdtemp(prefix="simpo-kube-"),
                                                                     "kubeconfig")
os.environ["KUBECONFIG"] = KUBECONFIG

import copy  # noqa: E402
import time  # noqa: E402
import uuid
from pathlib import Path
from typing import Any, Callable

import kubernetes  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from inmemory_apiserver import ApiServer  # noqa: E402
from simpo_operator import kube  # noqa: E402
from simpo_operator.resource import GROUP, PLURAL, VERSION  # noqa: E402

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


@pytest.fixture
def reference_job() -> dict[str, Any]:
    return yaml.safe_load(REFERENCE_JOB.read_text())


# ---- handler tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """The API server the handler tests talk to: in memory here; $SIMPO_TEST_KUBECONFIG points them at a real
    control plane (with the CRD installed) instead."""
    if os.environ.get("SIMPO_TEST_KUBECONFIG"):
        yield Path(KUBECONFIG)
        return
    server = ApiServer().start()
    Path(KUBECONFIG).write_text(server.kubeconfig())
    yield Path(KUBECONFIG)
    server.stop()


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

    def create_jobset(self, jobset: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(kube.JOBSET_GROUP, kube.JOBSET_VERSION, self.namespace,
                                                           kube.JOBSET_PLURAL, jobset)

    def create_configmap(self, configmap: dict[str, Any]) -> None:
        self.core.create_namespaced_config_map(self.namespace, configmap)

    def events(self, name: str) -> list[dict[str, Any]]:
        events = self.client.sanitize_for_serialization(self.core.list_namespaced_event(self.namespace))["items"]
        return [event for event in events if event["involvedObject"]["name"] == name]


@pytest.fixture
def kube_client(kubeconfig) -> Kube:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    client = Kube(kubeconfig, namespace)
    client.core.create_namespace({"metadata": {"name": namespace}})
    return client


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
