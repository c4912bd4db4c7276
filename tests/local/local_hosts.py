"""Multi-process test helpers: N local hosts with the environment the local runner gives a job's pods (the one
env builder; the same rendering as the operator's JobSet)."""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from simpo_interleave.local_runner import local_pods
from simpo_operator.resource import validate_job
from simpo_worker.contract import api

# Enough of a worker config for a valid job; tests that run their own scripts only use the distributed env.
_PLACEHOLDER_CONFIG = {
    "model": {"source": "smollm2"},
    "data": {"train_files": ["/dev/null"]},
    "trainer": {"num_train_steps": 1, "batch_size": 1},
    "output_dir": "/tmp/unused",
}


def cpu_job(hosts: int, config: dict[str, Any] | None = None, name: str = "local-test") -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": "default"},
            "spec": {"image": "simpo-interleave-worker:local", "hosts": hosts,
                     "config": copy.deepcopy(config or _PLACEHOLDER_CONFIG)}}


def host_envs(hosts: int, devices_per_host: int = 1, config: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Each host's environment, as the local runner resolves it from the rendered JobSet."""
    base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_host}"}
    pods = local_pods(validate_job(cpu_job(hosts, config)), Path(tempfile.mkdtemp(prefix="simpo-hosts-")), base)
    return [pod.env for pod in pods]


def start_workers(config: dict[str, Any], processes: int, devices_per_process: int,
                  *args: str, slices: int = 1) -> list[subprocess.Popen]:
    """The job's pods as local processes running the container's own command (the worker), each with its own
    stdout/stderr; extra `args` go to every worker. Unlike the local runner, nothing stops the others when one
    exits: each host lives or dies by itself. `slices` > 1: the processes are that many slices of consecutive
    processes, with a multislice pod's SIMPO_* slice environment (a CPU pool job has one slice; this stands in
    for a multislice TPU job, whose devices the worker groups by process on CPU)."""
    base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    pods = local_pods(validate_job(cpu_job(processes, config)), Path(tempfile.mkdtemp(prefix="simpo-hosts-")), base)
    hosts_per_slice = processes // slices
    for index, pod in enumerate(pods):
        pod.env.update({api.ENV_NUM_SLICES: str(slices), api.ENV_HOSTS_PER_SLICE: str(hosts_per_slice),
                        api.ENV_SLICE_INDEX: str(index // hosts_per_slice),
                        api.ENV_HOST_INDEX: str(index % hosts_per_slice)})
    return [subprocess.Popen([*pod.argv, *args], env=pod.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for pod in pods]


def run_workers(config: dict[str, Any], processes: int, devices_per_process: int, *args: str,
                timeout: int = 300, slices: int = 1) -> list[subprocess.CompletedProcess]:
    """start_workers, waited for."""
    running = start_workers(config, processes, devices_per_process, *args, slices=slices)
    results = []
    for process in running:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results
