"""The environment of one worker process: the contract between the pod (or local process) and the worker.

One pure function builds it for both the JobSet pod template (indexes from the pod via the downward API) and the
local runner (concrete indexes, coordinator on 127.0.0.1). The worker (simpo_worker.parallel.distributed) reads exactly:

  SIMPO_CONFIG             path of the worker config YAML (the mounted ConfigMap file in a pod)
  SIMPO_JOB_NAME           the SimpoInterleaveJob's name      } the leader patches status.progress of this resource
  SIMPO_JOB_NAMESPACE      the SimpoInterleaveJob's namespace } through the status subresource (its service account)
  SIMPO_NUM_SLICES         slices in the job (1 unless TPU multislice)
  SIMPO_HOSTS_PER_SLICE    hosts (processes) per slice
  SIMPO_SLICE_INDEX        this host's slice: the JobSet job index (`jobset.sigs.k8s.io/job-index`)
  SIMPO_HOST_INDEX         this host within its slice: the Indexed Job completion index
                           (`batch.kubernetes.io/job-completion-index`)
  SIMPO_LOG_FORMAT         json: one Cloud Logging entry per log line (the local runner passes the user's, else text)
  JAX_COORDINATOR_ADDRESS  host:port of process 0 (`<jobset>-worker-0-0.<jobset>:8476` in a pod)
  JAX_NUM_PROCESSES        SIMPO_NUM_SLICES * SIMPO_HOSTS_PER_SLICE
  JAX_PROCESS_ID           only where the number is known without arithmetic (local processes, single-slice pods);
                           the worker's rule is always
                               process_id = SIMPO_SLICE_INDEX * SIMPO_HOSTS_PER_SLICE + SIMPO_HOST_INDEX
                           and JAX_PROCESS_ID, where set, equals it (the downward API cannot add the slice offset)
  MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT
                           TPU multislice only (JobSet does not inject them): slice 0 host 0 coordinates the
                           data-center-network transfers between slices

On GKE TPU pools the JAX_* variables are left OFF on purpose: GKE injects TPU_WORKER_ID and TPU_WORKER_HOSTNAMES
into Indexed-Job pods that request google.com/tpu, and `jax.distributed.initialize()` without arguments uses them
(with MEGASCALE_* across slices). The SIMPO_* indexes are still set and agree with them (TPU_WORKER_ID is the
completion index), so the worker's host/shard numbering is the same on every platform. Rule for the worker: if
JAX_COORDINATOR_ADDRESS is set, pass coordinator/num_processes/process_id explicitly; otherwise let JAX detect.
"""

from __future__ import annotations

from typing import Any, Optional

from simpo_worker.contract import api

JOB_INDEX_ANNOTATION = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def worker_env(
    *,
    job_name: str,
    namespace: str,
    config_path: str,
    hosts_per_slice: int,
    slices: int = 1,
    coordinator_address: Optional[str],
    slice_index: Optional[int] = None,
    host_index: Optional[int] = None,
    megascale_coordinator_host: Optional[str] = None,
) -> list[dict[str, Any]]:
    """Container env entries ({name, value} or {name, valueFrom}) for one worker.

    coordinator_address: "host:port" of process 0, or None on TPU pools (JAX's own GKE detection).
    slice_index / host_index: concrete numbers (local runner), or None to read them from the pod's annotations.
    megascale_coordinator_host: host of slice 0 / host 0, for TPU multislice (slices > 1) only.
    """
    env = [
        _value(api.ENV_CONFIG, config_path),
        _value(api.ENV_JOB_NAME, job_name),
        _value(api.ENV_JOB_NAMESPACE, namespace),
        _value(api.ENV_NUM_SLICES, slices),
        _value(api.ENV_HOSTS_PER_SLICE, hosts_per_slice),
        _index(api.ENV_SLICE_INDEX, slice_index, JOB_INDEX_ANNOTATION),
        _index(api.ENV_HOST_INDEX, host_index, COMPLETION_INDEX_ANNOTATION),
        # A pod's stdout goes to Cloud Logging, which parses JSON lines into structured entries.
        _value(api.ENV_LOG_FORMAT, "json"),
    ]
    if coordinator_address is not None:
        env += [
            _value(api.ENV_COORDINATOR_ADDRESS, coordinator_address),
            _value(api.ENV_NUM_PROCESSES, slices * hosts_per_slice),
        ]
        if slice_index is not None and host_index is not None:
            env.append(_value(api.ENV_PROCESS_ID, slice_index * hosts_per_slice + host_index))
        elif slices == 1:
            env.append(_index(api.ENV_PROCESS_ID, host_index, COMPLETION_INDEX_ANNOTATION))
    if slices > 1:
        if megascale_coordinator_host is None:
            raise ValueError("multislice needs megascale_coordinator_host (slice 0, host 0)")
        env += [
            _value(api.ENV_MEGASCALE_COORDINATOR_ADDRESS, f"{megascale_coordinator_host}:{api.MEGASCALE_PORT}"),
            _value(api.ENV_MEGASCALE_NUM_SLICES, slices),
            _index(api.ENV_MEGASCALE_SLICE_ID, slice_index, JOB_INDEX_ANNOTATION),
            _value(api.ENV_MEGASCALE_PORT, api.MEGASCALE_PORT),
        ]
    return env


def env_dict(env: list[dict[str, Any]]) -> dict[str, str]:
    """Concrete env entries as a mapping (for a local process); refuses entries that need a pod."""
    unresolved = [entry["name"] for entry in env if "value" not in entry]
    if unresolved:
        raise ValueError(f"env needs a pod to resolve: {', '.join(unresolved)}")
    return {entry["name"]: entry["value"] for entry in env}


def _value(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _index(name: str, value: Optional[int], annotation: str) -> dict[str, Any]:
    if value is not None:
        return _value(name, value)
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}}


# Every name worker_env can set: a multislice process with concrete indexes and a coordinator gets them all.
OPERATOR_ENV_NAMES = tuple(entry["name"] for entry in worker_env(
    job_name="", namespace="", config_path="", hosts_per_slice=1, slices=2, coordinator_address="",
    slice_index=0, host_index=0, megascale_coordinator_host=""))
