"""The few Kubernetes API calls the handlers make (kubernetes client; in-cluster or kubeconfig auth).

Each call here is listed in the operator's ClusterRole (manifests/operator-rbac.yaml); nothing else is used.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

import kubernetes

from simpo_worker.contract.api import GROUP, PLURAL, VERSION

JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"
JOBSET_PLURAL = "jobsets"
MERGE_PATCH = "application/merge-patch+json"
# Concurrent API calls: kopf's handler threads (handlers.settings) plus the JobSet events' pool, each with a
# kept-alive connection (the client's default pool keeps CPU count x 5: 10 here; a request beyond the pool's size
# opens a connection, with its TLS handshake, and closes it after). 16 handler threads queued a burst of 100
# creations behind each other's API calls (2.5 s for the last one): the calls wait on the API server, not the CPU.
CONNECTIONS = 100
# (connect, read) seconds for every request: the client's default is to wait forever, and a handler thread stuck on
# a dead connection would hold its job's reconcile (kopf retries a handler that raises).
REQUEST_TIMEOUT_S = (10, 60)


class ChildConflictError(Exception):
    """A child's name is taken by an object that this resource does not own."""


class _ApiClientWithTimeout(kubernetes.client.ApiClient):
    """The client, with REQUEST_TIMEOUT_S on every request that does not set its own."""

    def call_api(self, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return super().call_api(*args, _request_timeout=_request_timeout or REQUEST_TIMEOUT_S, **kwargs)


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    """Service-account credentials inside a pod, else the current kubeconfig context (like kubectl)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG as it is now: the client's own default is the value it had when kubernetes was imported.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                           client_configuration=configuration)
    configuration.connection_pool_maxsize = CONNECTIONS + 4
    return _ApiClientWithTimeout(configuration)


def warm_up() -> None:
    """Build the API client and import the client's modules the handlers use now, at startup: the kubernetes
    package imports them on first use, which took 0.8 s of the first handlers' time under a burst of events."""
    api_client()
    for name in ("CoreV1Api", "BatchV1Api", "CustomObjectsApi", "V1ConfigMap", "V1DeleteOptions", "V1Preconditions"):
        getattr(kubernetes.client, name)


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def _not_found(error: kubernetes.client.ApiException) -> bool:
    return error.status == 404


def get_jobset(namespace: str, name: str) -> Optional[dict[str, Any]]:
    try:
        return _custom().get_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, name)
    except kubernetes.client.ApiException as error:
        if _not_found(error):
            return None
        raise


def get_batch_job(namespace: str, name: str) -> Optional[dict[str, Any]]:
    """A batch/v1 Job of a JobSet (to read why it failed)."""
    try:
        job = kubernetes.client.BatchV1Api(api_client()).read_namespaced_job(name, namespace)
    except kubernetes.client.ApiException as error:
        if _not_found(error):
            return None
        raise
    return api_client().sanitize_for_serialization(job)


def list_job_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pods of a batch/v1 Job (its own selector), to tell which host failed it."""
    labels = ",".join(f"{key}={value}" for key, value in job["spec"]["selector"]["matchLabels"].items())
    pods = _core().list_namespaced_pod(job["metadata"]["namespace"], label_selector=labels)
    return api_client().sanitize_for_serialization(pods)["items"]


def _json(response: Any) -> dict[str, Any]:
    # A raw response (_preload_content=False) as plain JSON: a model (V1ConfigMap ...) costs a (de)serialisation
    # of each field in Python each way, the handlers' CPU on the create path.
    return json.loads(response.data)


def get_configmap(namespace: str, name: str) -> Optional[dict[str, Any]]:
    try:
        return _json(_core().read_namespaced_config_map(name, namespace, _preload_content=False))
    except kubernetes.client.ApiException as error:
        if _not_found(error):
            return None
        raise


def api_message(error: kubernetes.client.ApiException) -> str:
    """The API server's own message of a failed request (its Status body), else the HTTP reason."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


def create_or_adopt(obj: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
    """Create a child, or take the existing one of that name if this owner already owns it (after an operator
    restart, or a retried handler). Returns (object, created)."""
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    is_jobset = obj["kind"] == "JobSet"
    try:
        if is_jobset:
            created = _custom().create_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, namespace,
                                                                JOBSET_PLURAL, obj)
        else:
            created = _json(_core().create_namespaced_config_map(namespace, obj, _preload_content=False))
        return created, True
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise
    existing = get_jobset(namespace, name) if is_jobset else get_configmap(namespace, name)
    if existing is None:  # deleted between the create and the read: kopf retries the handler
        raise RuntimeError(f"{obj['kind']} {namespace}/{name} vanished while adopting it")
    owners = {ref.get("uid") for ref in existing["metadata"].get("ownerReferences") or []}
    if owner_uid not in owners:
        raise ChildConflictError(f"{obj['kind']} {namespace}/{name} exists and is not owned by this job")
    return existing, False


def set_jobset_suspend(namespace: str, name: str, suspend: bool) -> dict[str, Any]:
    return _custom().patch_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, name,
                                                    {"spec": {"suspend": suspend}},
                                                    _content_type=MERGE_PATCH)


def get_job(namespace: str, name: str) -> Optional[dict[str, Any]]:
    try:
        return _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as error:
        if _not_found(error):
            return None
        raise


def patch_job_status(namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return _custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                           {"status": status}, _content_type=MERGE_PATCH)


def delete_job(namespace: str, name: str, uid: str) -> None:
    """Delete the resource (children follow through owner references). Already gone, or replaced by a namesake
    (the uid precondition fails with 409), is fine: there is nothing of ours left to delete."""
    body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid),
                                             propagation_policy="Background")
    try:
        _custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body)
    except kubernetes.client.ApiException as error:
        if not _not_found(error) and error.status != 409:
            raise


# kopf peering (several replicas): ClusterKopfPeering when serving every namespace, else a KopfPeering per namespace.
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def _peering_plural(namespace: Optional[str]) -> str:
    return "clusterkopfpeerings" if namespace is None else "kopfpeerings"


def ensure_peering(name: str, namespace: Optional[str]) -> None:
    """Create the peering object kopf keeps its peers' records in, unless it exists (kopf does not create it)."""
    kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": {"name": name}}
    try:
        if namespace is None:
            _custom().create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, _peering_plural(None), body)
        else:
            _custom().create_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace,
                                                      _peering_plural(namespace), body)
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise


def get_peers(name: str, namespace: Optional[str]) -> dict[str, Any]:
    """The peers' records (the peering object's status)."""
    if namespace is None:
        obj = _custom().get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, _peering_plural(None), name)
    else:
        obj = _custom().get_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace,
                                                     _peering_plural(namespace), name)
    return obj.get("status") or {}
