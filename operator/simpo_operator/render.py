"""SimpoInterleaveJob -> the ConfigMap (worker config) and JobSet the operator creates. Pure: no cluster needed.

`simpo-interleave render JOB.yaml` prints them. The JobSet has one replicated job `worker` with one Job per slice
(`replicas = slices`), each Job a slice's hosts (`parallelism = completions = hosts`, Indexed). A Job never retries
a pod (`backoffLimit: 0`): any failure fails the Job, and the JobSet either fails at once (the worker's
non-retryable exit codes, through the pod failure policy), restarts every pod without spending a restart (a pod
disrupted by preemption, maintenance or eviction: the DisruptionTarget condition), or restarts every pod
(`failurePolicy.maxRestarts`); the worker resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from simpo_operator import pod_env
from simpo_operator.resource import (APP_LABELS, JOB_LABEL, QUEUE_NAME_LABEL, RESERVATION_AFFINITY_LABEL,
                                     RESERVATION_LABEL, SPOT_LABEL, WORKLOAD_PRIORITY_LABEL, CONFIG_VOLUME, Job, load_job, validate_job)
from simpo_operator.tpu import ACCELERATOR_LABEL, TOPOLOGY_LABEL
from simpo_worker.contract import api
from simpo_worker.contract.api import API_VERSION, KIND, NON_RETRYABLE_EXIT_CODES
from simpo_worker.contract.config import dump_worker_config
from simpo_worker.contract.schema import to_data

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "worker"
CONTAINER = "worker"
TPU_RESOURCE = "google.com/tpu"
# Multislice: each slice's Job gets a node pool of its own.
EXCLUSIVE_TOPOLOGY_ANNOTATION = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
# The Job controller's reason on a Job that a pod failure policy rule failed, and its message when the rule matched
# a pod condition ("Pod NS/NAME has condition DisruptionTarget matching FailJob rule at index N"). JobSet v0.12 can
# tell the two FailJob rules apart only by the message (the per-rule reasons of KEP-4443 are not in Kubernetes yet).
POD_FAILURE_POLICY_REASON = "PodFailurePolicy"
DISRUPTION_MESSAGE_PATTERN = "has condition DisruptionTarget matching FailJob rule"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-config"


def jobset_name(job_name: str) -> str:
    return job_name


def pod_hostname(job_name: str, slice_index: int, host_index: int) -> str:
    """JobSet's pod hostname; with the JobSet's subdomain it resolves inside the namespace."""
    return f"{jobset_name(job_name)}-{REPLICATED_JOB}-{slice_index}-{host_index}.{jobset_name(job_name)}"


def render_job(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate a SimpoInterleaveJob and render [ConfigMap, JobSet], both owned by the resource."""
    job = validate_job(resource)
    return [render_configmap(job), render_jobset(job)]


def owner_reference(job: Job) -> list[dict[str, Any]]:
    # Without a uid (rendering a file, the local runner) there is no owner yet.
    if job.uid is None:
        return []
    return [{"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
             "controller": True, "blockOwnerDeletion": True}]


def _metadata(job: Job, name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": _labels(job)}
    if job.uid is not None:
        metadata["ownerReferences"] = owner_reference(job)
    return metadata


def _labels(job: Job) -> dict[str, str]:
    return {JOB_LABEL: job.name, **APP_LABELS}


def render_configmap(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, configmap_name(job.name)),
        "data": {api.CONFIG_FILE: dump_worker_config(job.spec.config)},
    }


def render_jobset(job: Job) -> dict[str, Any]:
    name = jobset_name(job.name)
    metadata = _metadata(job, name)
    if job.shape is not None and job.slices > 1:
        metadata["annotations"] = {EXCLUSIVE_TOPOLOGY_ANNOTATION: NODE_POOL_LABEL}
    if job.spec.queueName is not None:
        metadata["labels"][QUEUE_NAME_LABEL] = job.spec.queueName
    if job.spec.workloadPriorityClassName is not None:
        metadata["labels"][WORKLOAD_PRIORITY_LABEL] = job.spec.workloadPriorityClassName
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            # Under Kueue the JobSet starts suspended and Kueue alone unsuspends (admits) it.
            "suspend": job.spec.suspend or job.spec.queueName is not None,
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "failurePolicy": {
                "maxRestarts": job.spec.maxRestarts,
                # The first matching rule applies. JobSet's webhook allows letters, digits and `_,:` in rule names.
                "rules": [{
                    "name": "restart_on_disruption",
                    "action": "RestartJobSetAndIgnoreMaxRestarts",
                    "onJobFailureReasons": [POD_FAILURE_POLICY_REASON],
                    "onJobFailureMessagePatterns": [DISRUPTION_MESSAGE_PATTERN],
                }, {
                    "name": "fail_on_non_retryable_exit_code",
                    "action": "FailJobSet",
                    "onJobFailureReasons": [POD_FAILURE_POLICY_REASON],
                }],
            },
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": job.slices,
                "template": {"metadata": {"labels": _labels(job)}, "spec": _job_spec(job)},
            }],
        },
    }


def _job_spec(job: Job) -> dict[str, Any]:
    return {
        "parallelism": job.hosts_per_slice,
        "completions": job.hosts_per_slice,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        # The first matching rule applies: a non-retryable exit code fails the job even on a disrupted pod.
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)},
        }, {
            "action": "FailJob",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }]},
        "template": {"metadata": _pod_metadata(job), "spec": _pod_spec(job)},
    }


def _pod_metadata(job: Job) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": {**(job.spec.pod.labels or {}), **_labels(job)}}
    if job.spec.pod.annotations:
        metadata["annotations"] = dict(job.spec.pod.annotations)
    return metadata


def _pod_spec(job: Job) -> dict[str, Any]:
    pod, scheduling = job.spec.pod, job.spec.scheduling
    spec: dict[str, Any] = {
        # The JobSet webhook would default this to OnFailure; restarts happen at the JobSet level.
        "restartPolicy": "Never",
        # SIGTERM to SIGKILL: the worker finishes its step and checkpoints in between (simpo_worker.preemption).
        "terminationGracePeriodSeconds": job.spec.terminationGracePeriodSeconds,
        "serviceAccountName": job.spec.serviceAccountName,
        "containers": [_container(job)],
        "volumes": [{"name": CONFIG_VOLUME, "configMap": {"name": configmap_name(job.name)}}, *pod.volumes],
    }
    node_selector, tolerations = dict(scheduling.nodeSelector or {}), to_data(scheduling.tolerations)
    if job.shape is not None:
        node_selector.update({ACCELERATOR_LABEL: job.shape.gke_accelerator, TOPOLOGY_LABEL: job.shape.topology})
        tolerations.insert(0, {"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if scheduling.spot:
        node_selector[SPOT_LABEL] = "true"
        tolerations.append({"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"})
    if scheduling.reservation is not None:
        node_selector.update({RESERVATION_LABEL: scheduling.reservation, RESERVATION_AFFINITY_LABEL: "specific"})
    if node_selector:
        spec["nodeSelector"] = node_selector
    if tolerations:
        spec["tolerations"] = tolerations
    if scheduling.affinity:
        spec["affinity"] = scheduling.affinity
    if job.spec.priorityClassName is not None:
        spec["priorityClassName"] = job.spec.priorityClassName
    if pod.imagePullSecrets:
        spec["imagePullSecrets"] = to_data(pod.imagePullSecrets)
    if pod.hostNetwork:
        # Pods on the host network still resolve each other's JobSet hostnames through the cluster DNS.
        spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    return spec


def _container(job: Job) -> dict[str, Any]:
    first_host = pod_hostname(job.name, 0, 0)
    env = pod_env.worker_env(
        job_name=job.name,
        namespace=job.namespace,
        config_path=api.CONFIG_PATH,
        hosts_per_slice=job.hosts_per_slice,
        slices=job.slices,
        # TPU pools: JAX's own GKE detection (see pod_env); elsewhere an explicit coordinator.
        coordinator_address=None if job.shape is not None else f"{first_host}:{api.COORDINATOR_PORT}",
        megascale_coordinator_host=first_host if job.slices > 1 else None,
    )
    container = {
        "name": CONTAINER,
        "image": job.spec.image,
        "command": ["simpo-interleave", "worker"],
        "env": env + to_data(job.spec.pod.env),
        "ports": [{"name": "coordinator", "containerPort": api.COORDINATOR_PORT}],
        "resources": _resources(job),
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": api.CONFIG_DIR, "readOnly": True},
                         *to_data(job.spec.pod.volumeMounts)],
    }
    if job.spec.pod.envFrom:
        container["envFrom"] = to_data(job.spec.pod.envFrom)
    return container


def _resources(job: Job) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {}
    for kind in ("requests", "limits"):
        wanted = getattr(job.spec.resources, kind)
        values = {key: value for key, value in (("cpu", wanted.cpu), ("memory", wanted.memory)) if value is not None}
        if job.shape is not None:
            values[TPU_RESOURCE] = job.shape.chips_per_host
        if values:
            resources[kind] = values
    return resources


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the worker config) as literal blocks, so the ConfigMap reads like the file it is."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_objects(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="SimpoInterleaveJob YAML file")
    parser.add_argument("--namespace", help="namespace when the file sets none (default: default)")


def run(args: argparse.Namespace) -> int:
    resource = load_job(args.job)
    if args.namespace and not resource.get("metadata", {}).get("namespace"):
        resource = {**resource, "metadata": {**resource.get("metadata", {}), "namespace": args.namespace}}
    sys.stdout.write(dump_objects(render_job(resource)))
    return 0
