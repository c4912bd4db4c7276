"""`simpo-interleave local JOB.yaml`: a SimpoInterleaveJob without a cluster, running what the operator would create.

The file a user would `kubectl apply` is validated and rendered by the operator's own renderer. Then this module
plays the parts of the cluster for each (slice, host) pod of the JobSet:
- the ConfigMap: its data is written where the pod template mounts it (a directory of the run stands in for the
  mount path, and env values under the mount path point there);
- the JobSet and Job controllers: each pod's index annotations, which the env's fieldRefs resolve from, and the
  JOB_COMPLETION_INDEX variable the Job controller adds;
- cluster DNS: the JobSet's pod hostnames resolve to 127.0.0.1, and the coordinator gets a free port of its own
  (several local jobs may run at once);
- GKE's TPU environment: TPU pods leave jax.distributed to GKE's injected variables, so locally the coordinator,
  process count and id are set as JAX would detect them there.
Then it runs the container's own command, on CPU, one process per pod.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from simpo_interleave.host_processes import free_port, run_host_processes
from simpo_operator import pod_env, render
from simpo_operator.resource import Job, load_job, validate_job
from simpo_worker.contract import api
from simpo_worker.contract.errors import ConfigError

DEFAULT_TIMEOUT_S = 6 * 3600
LOCALHOST = "127.0.0.1"
_ANNOTATION_FIELD = re.compile(r"^metadata\.annotations\['([^']+)'\]$")


@dataclass(frozen=True)
class LocalPod:
    slice_index: int
    host_index: int
    argv: list[str]
    env: dict[str, str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="SimpoInterleaveJob YAML (the file you would kubectl apply)")
    parser.add_argument("--hosts", type=int, default=None,
                        help="run as a CPU pool of N hosts instead of the job's own shape (spec.tpu or spec.hosts)")
    parser.add_argument("--output-dir", default=None, help="override spec.outputDir / config.output_dir")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="stop every host after this long (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    return run_job_file(args.job, hosts=args.hosts, output_dir=args.output_dir, timeout_s=args.timeout_s)


def local_resource(resource: dict[str, Any], hosts: int | None = None,
                   output_dir: str | None = None) -> dict[str, Any]:
    """The resource with the local overrides applied: a CPU pool of `hosts`, and an (absolute) output dir."""
    spec = dict(resource.get("spec") or {})
    if hosts is not None:
        spec.pop("tpu", None)
        spec["hosts"] = hosts
    if output_dir is not None:
        spec["outputDir"] = output_dir if "://" in output_dir else os.path.abspath(output_dir)
    return {**resource, "spec": spec}


def local_pods(job: Job, workdir: Path, base_env: Mapping[str, str] | None = None,
               port: int | None = None) -> list[LocalPod]:
    """Every pod of the job's rendered JobSet, as a local command and its resolved environment."""
    configmap, jobset = render.render_configmap(job), render.render_jobset(job)
    [replicated] = jobset["spec"]["replicatedJobs"]
    pod_spec = replicated["template"]["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    mounts = _mount_configmaps(pod_spec, container, {configmap["metadata"]["name"]: configmap}, workdir)
    port = port or free_port()
    hosts = {render.pod_hostname(job.name, s, h): LOCALHOST
             for s in range(job.slices) for h in range(job.hosts_per_slice)}
    argv = _command(container)
    pods = []
    for slice_index in range(replicated["replicas"]):
        for host_index in range(replicated["template"]["spec"]["completions"]):
            annotations = {pod_env.JOB_INDEX_ANNOTATION: str(slice_index),
                           pod_env.COMPLETION_INDEX_ANNOTATION: str(host_index)}
            env = {entry["name"]: _localize(_resolve(entry, annotations), mounts, hosts, port)
                   for entry in container["env"]}
            # The Job controller adds this to every pod of an Indexed Job.
            env["JOB_COMPLETION_INDEX"] = str(host_index)
            if job.shape is not None:  # what jax.distributed detects from GKE's TPU environment
                env.setdefault(api.ENV_COORDINATOR_ADDRESS, f"{LOCALHOST}:{port}")
                env.setdefault(api.ENV_NUM_PROCESSES, str(job.num_processes))
                env.setdefault(api.ENV_PROCESS_ID, str(slice_index * job.hosts_per_slice + host_index))
            base = os.environ if base_env is None else base_env
            full_env = {**base, "JAX_PLATFORMS": "cpu", **env}
            # A terminal, not Cloud Logging, reads these lines: the pods' json only when asked for.
            full_env[api.ENV_LOG_FORMAT] = base.get(api.ENV_LOG_FORMAT, "text")
            pods.append(LocalPod(slice_index, host_index, argv, full_env))
    return pods


def run_job_file(file: str, hosts: int | None = None, output_dir: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, extra_env: dict[str, str] | None = None) -> int:
    if hosts is not None and hosts < 1:
        raise ConfigError(f"--hosts: must be >= 1, got {hosts}")
    job = validate_job(local_resource(load_job(file), hosts=hosts, output_dir=output_dir))
    with tempfile.TemporaryDirectory(prefix="simpo-local-") as workdir:
        pods = local_pods(job, Path(workdir), base_env={**os.environ, **(extra_env or {})})
        print(f"running {job.namespace}/{job.name} as {len(pods)} local host(s); outputs in "
              f"{job.spec.config.output_dir}", flush=True)
        code = run_host_processes(pods[0].argv, [pod.env for pod in pods], timeout_s)
    print(f"{job.name}: {'succeeded' if code == 0 else f'failed (exit code {code})'}", flush=True)
    return code


def _mount_configmaps(pod_spec: dict[str, Any], container: dict[str, Any], configmaps: dict[str, dict[str, Any]],
                      workdir: Path) -> dict[str, str]:
    """Write each mounted ConfigMap's data into a local directory; mount path -> that directory."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            raise ConfigError(f"volume {mount['name']!r}: the local runner mounts only ConfigMaps")
        directory = workdir / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for key, text in configmaps[source["name"]]["data"].items():
            (directory / key).write_text(text, encoding="utf-8")
        mounts[mount["mountPath"]] = str(directory)
    return mounts


def _resolve(entry: dict[str, Any], annotations: Mapping[str, str]) -> str:
    """An env entry's value as the kubelet would give it, from the pod's annotations for fieldRefs."""
    if "value" in entry:
        return entry["value"]
    field_path = entry["valueFrom"]["fieldRef"]["fieldPath"]
    match = _ANNOTATION_FIELD.match(field_path)
    if match is None:
        raise ConfigError(f"env {entry['name']}: the local runner resolves only annotation fieldRefs, got "
                          f"{field_path}")
    return annotations[match.group(1)]


def _localize(value: str, mounts: Mapping[str, str], hosts: Mapping[str, str], port: int) -> str:
    for mount_path, directory in mounts.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            value = directory + value[len(mount_path.rstrip("/")):]
    for hostname, address in hosts.items():
        value = value.replace(hostname, address)
    return value.replace(f"{LOCALHOST}:{api.COORDINATOR_PORT}", f"{LOCALHOST}:{port}")


def _command(container: dict[str, Any]) -> list[str]:
    """The container's command, found next to this Python first (the project's virtual environment)."""
    command = [*container["command"], *container.get("args", [])]
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    executable = shutil.which(command[0], path=search)
    if executable is None:
        raise ConfigError(f"container command {command[0]!r} not found (install the project: make install)")
    return [executable, *command[1:]]
