"""The pod -> worker environment contract, for pods (downward API) and local processes (concrete values)."""

import pytest

from simpo_operator import pod_env
from simpo_worker.contract import api


def names(env):
    return [entry["name"] for entry in env]


def test_local_process_gets_concrete_values():
    env = pod_env.env_dict(pod_env.worker_env(
        job_name="demo", namespace="default", config_path="/tmp/c.yaml", hosts_per_slice=4,
        coordinator_address="127.0.0.1:1234", slice_index=0, host_index=3))
    assert env == {
        "SIMPO_CONFIG": "/tmp/c.yaml", "SIMPO_JOB_NAME": "demo", "SIMPO_JOB_NAMESPACE": "default",
        "SIMPO_NUM_SLICES": "1", "SIMPO_HOSTS_PER_SLICE": "4", "SIMPO_SLICE_INDEX": "0", "SIMPO_HOST_INDEX": "3",
        "SIMPO_LOG_FORMAT": "json",
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
    }


def test_process_id_adds_the_slice_offset():
    env = pod_env.env_dict(pod_env.worker_env(
        job_name="j", namespace="n", config_path="c", hosts_per_slice=4, slices=2, coordinator_address="h:1",
        slice_index=1, host_index=2, megascale_coordinator_host="h"))
    assert env["JAX_PROCESS_ID"] == "6" and env["JAX_NUM_PROCESSES"] == "8"
    assert env["MEGASCALE_SLICE_ID"] == "1" and env["MEGASCALE_NUM_SLICES"] == "2"
    assert int(env["SIMPO_SLICE_INDEX"]) * int(env["SIMPO_HOSTS_PER_SLICE"]) + int(env["SIMPO_HOST_INDEX"]) == 6


def test_pod_reads_indexes_from_its_annotations():
    env = {e["name"]: e for e in pod_env.worker_env(
        job_name="j", namespace="n", config_path=api.CONFIG_PATH, hosts_per_slice=2,
        coordinator_address="j-worker-0-0.j:8476")}
    field = lambda name: env[name]["valueFrom"]["fieldRef"]["fieldPath"]  # noqa: E731
    assert field("SIMPO_HOST_INDEX") == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert field("SIMPO_SLICE_INDEX") == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    # Single slice: the process id is the completion index itself.
    assert field("JAX_PROCESS_ID") == field("SIMPO_HOST_INDEX")


def test_multislice_pod_leaves_the_process_id_to_the_worker():
    env = pod_env.worker_env(job_name="j", namespace="n", config_path="c", hosts_per_slice=2, slices=2,
                             coordinator_address="h:1", megascale_coordinator_host="h")
    assert "JAX_PROCESS_ID" not in names(env)
    with pytest.raises(ValueError, match="SIMPO_SLICE_INDEX, SIMPO_HOST_INDEX, MEGASCALE_SLICE_ID"):
        pod_env.env_dict(env)


def test_tpu_pods_leave_jax_to_its_gke_detection():
    env = pod_env.worker_env(job_name="j", namespace="n", config_path="c", hosts_per_slice=4,
                             coordinator_address=None)
    assert not [name for name in names(env) if name.startswith("JAX_")]


def test_multislice_needs_a_megascale_coordinator():
    with pytest.raises(ValueError, match="megascale_coordinator_host"):
        pod_env.worker_env(job_name="j", namespace="n", config_path="c", hosts_per_slice=4, slices=2,
                           coordinator_address=None)


def test_docstring_lists_every_variable():
    env = pod_env.worker_env(job_name="j", namespace="n", config_path="c", hosts_per_slice=1, slices=2,
                             coordinator_address="h:1", slice_index=0, host_index=0, megascale_coordinator_host="h")
    for name in names(env):
        assert name in pod_env.__doc__, name
