"""The local runner runs what the operator renders: each pod's env resolved from the JobSet pod template as the
cluster would, the ConfigMap's data where the pod mounts it, and the container's own command."""

from __future__ import annotations

import copy

import pytest
import yaml

from local_hosts import cpu_job
from simpo_interleave.local_runner import LOCALHOST, local_pods, local_resource
from simpo_operator import pod_env, render
from simpo_operator.resource import validate_job
from simpo_worker.contract import api
from simpo_worker.contract.errors import ConfigError
from simpo_worker.parallel.distributed import process_id_from_env


def multislice_job() -> dict:
    resource = cpu_job(1)
    del resource["spec"]["hosts"]
    resource["spec"]["tpu"] = {"type": "v5p-16", "slices": 2}  # 2 slices x 2 hosts x 4 chips
    resource["spec"]["config"]["trainer"]["batch_size"] = 16
    return resource


def operator_env(container: dict, slice_index: int, host_index: int) -> dict[str, str]:
    """The pod template's env with each fieldRef resolved from the annotations the JobSet and Job controllers put
    on pod (slice_index, host_index): what the kubelet hands the container."""
    annotations = {pod_env.JOB_INDEX_ANNOTATION: str(slice_index),
                   pod_env.COMPLETION_INDEX_ANNOTATION: str(host_index)}
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            field_path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            env[entry["name"]] = next(value for key, value in annotations.items()
                                      if field_path == f"metadata.annotations['{key}']")
    return env


def test_local_runner_and_operator_give_each_multislice_pod_the_same_environment(tmp_path):
    job = validate_job(multislice_job())
    jobset = render.render_jobset(job)
    [replicated] = jobset["spec"]["replicatedJobs"]
    [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
    pods = local_pods(job, tmp_path, base_env={}, port=45678)
    assert [(p.slice_index, p.host_index) for p in pods] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first_host = render.pod_hostname(job.name, 0, 0)
    for pod in pods:
        expected = operator_env(container, pod.slice_index, pod.host_index)
        # The cluster's parts the local runner stands in for: the config mount and the DNS name of host 0.
        expected[api.ENV_CONFIG] = str(tmp_path / "config" / api.CONFIG_FILE)
        expected[api.ENV_MEGASCALE_COORDINATOR_ADDRESS] = expected[api.ENV_MEGASCALE_COORDINATOR_ADDRESS].replace(
            first_host, LOCALHOST)
        # GKE's TPU environment, from which jax.distributed finds its coordinator and process id on a slice.
        # The Job controller's own variable on every pod of an Indexed Job.
        expected["JOB_COMPLETION_INDEX"] = str(pod.host_index)
        # A terminal reads the local runner's logs: text, where the pods' go to Cloud Logging as JSON.
        assert expected[api.ENV_LOG_FORMAT] == "json"
        expected[api.ENV_LOG_FORMAT] = "text"
        expected |= {api.ENV_COORDINATOR_ADDRESS: f"{LOCALHOST}:45678", api.ENV_NUM_PROCESSES: "4",
                     api.ENV_PROCESS_ID: str(pod.slice_index * 2 + pod.host_index), "JAX_PLATFORMS": "cpu"}
        assert pod.env == expected
        assert process_id_from_env({k: v for k, v in pod.env.items() if k != api.ENV_PROCESS_ID}) == \
            int(pod.env[api.ENV_PROCESS_ID])
        assert pod.env[api.ENV_MEGASCALE_SLICE_ID] == str(pod.slice_index)
    # A user's own choice holds.
    assert {p.env[api.ENV_LOG_FORMAT] for p in local_pods(job, tmp_path, base_env={api.ENV_LOG_FORMAT: "json"},
                                                          port=45678)} == {"json"}
    # The ConfigMap's data, where the pod reads it.
    written = (tmp_path / "config" / api.CONFIG_FILE).read_text()
    assert written == render.render_configmap(job)["data"][api.CONFIG_FILE]
    assert yaml.safe_load(written)["trainer"]["batch_size"] == 16


def test_it_runs_the_containers_own_command(tmp_path):
    job = validate_job(cpu_job(2))
    [container] = render.render_jobset(job)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"]
    pods = local_pods(job, tmp_path)
    assert container["command"] == ["simpo-interleave", "worker"]
    assert all(pod.argv[0].endswith("/simpo-interleave") and pod.argv[1:] == ["worker"] for pod in pods)
    assert [pod.env[api.ENV_COORDINATOR_ADDRESS] for pod in pods] == [pods[0].env[api.ENV_COORDINATOR_ADDRESS]] * 2
    assert pods[0].env[api.ENV_COORDINATOR_ADDRESS].startswith(f"{LOCALHOST}:")


def test_hosts_override_runs_a_tpu_job_as_a_cpu_pool(tmp_path):
    resource = local_resource(multislice_job(), hosts=3, output_dir="relative/out")
    job = validate_job(resource)
    assert (job.shape, job.num_processes) == (None, 3)
    assert job.spec.config.output_dir.startswith("/") and job.spec.config.output_dir.endswith("relative/out")
    assert len(local_pods(job, tmp_path)) == 3


def test_the_local_runner_refuses_what_the_operator_refuses():
    resource = copy.deepcopy(multislice_job())
    resource["spec"]["config"]["trainer"]["batch_size"] = 6
    with pytest.raises(ConfigError, match=r"^spec\.config\.trainer\.batch_size: .* not divisible by the 16"):
        validate_job(local_resource(resource))
