"""`simpo-interleave local JOB.yaml --hosts N`: a SimpoInterleaveJob without a cluster.

The same file a user would `kubectl apply` is validated and rendered exactly as the operator does; its worker
config is written where the ConfigMap would be mounted, and each host runs as a local process with the
environment its pod would get (pod_env.worker_env, coordinator on 127.0.0.1), on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from simpo_operator import pod_env
from simpo_worker import api
from simpo_interleave.host_processes import free_port, run_host_processes
from simpo_operator.resource import load_job, validate_job
from simpo_worker.config import dump_worker_config
from simpo_worker.schema import replace

DEFAULT_TIMEOUT_S = 6 * 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="SimpoInterleaveJob YAML (the file you would kubectl apply)")
    parser.add_argument("--hosts", type=int, default=None,
                        help="local host processes (default: the job's hosts, slices included)")
    parser.add_argument("--output-dir", default=None, help="override spec.outputDir / config.output_dir")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="stop every host after this long (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    return run_job_file(args.job, hosts=args.hosts, output_dir=args.output_dir, timeout_s=args.timeout_s)


def run_job_file(file: str, hosts: int | None = None, output_dir: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, extra_env: dict[str, str] | None = None) -> int:
    job = validate_job(load_job(file))
    config = job.spec.config
    if output_dir is not None:
        config = replace(config, output_dir=output_dir)
    hosts = hosts or job.num_processes
    if hosts < 1:
        raise SystemExit(f"--hosts: must be >= 1, got {hosts}")
    with tempfile.TemporaryDirectory(prefix="simpo-local-") as workdir:
        config_path = os.path.join(workdir, api.CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(dump_worker_config(config))
        coordinator = f"127.0.0.1:{free_port()}"
        envs = []
        for host in range(hosts):
            env = pod_env.env_dict(pod_env.worker_env(
                job_name=job.name, namespace=job.namespace, config_path=config_path, hosts_per_slice=hosts,
                coordinator_address=coordinator, slice_index=0, host_index=host))
            envs.append({**os.environ, "JAX_PLATFORMS": "cpu", **(extra_env or {}), **env})
        print(f"running {job.namespace}/{job.name} as {hosts} local host(s); outputs in {config.output_dir}",
              flush=True)
        code = run_host_processes([sys.executable, "-m", "simpo_interleave.cli", "worker"], envs, timeout_s)
    print(f"{job.name}: {'succeeded' if code == 0 else f'failed (exit code {code})'}", flush=True)
    return code
