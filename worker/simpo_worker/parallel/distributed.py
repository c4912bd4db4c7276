"""jax.distributed from the pod environment, and cross-host barriers that time out naming the missing hosts.

Environment (the contract of simpo_operator.pod_env, shared by the JobSet pods and the local runner):
- GKE TPU pods: JAX's own cluster detection (GKE injects TPU_WORKER_ID / TPU_WORKER_HOSTNAMES).
- Elsewhere: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, and JAX_PROCESS_ID; where the id is not
  given directly (multislice pods: the downward API cannot add), SIMPO_SLICE_INDEX * SIMPO_HOSTS_PER_SLICE +
  SIMPO_HOST_INDEX (the pod's completion index).
- No JAX_NUM_PROCESSES (or 1): a single process, no coordinator.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

from simpo_worker.contract import api
from simpo_worker.contract.errors import ConfigError

log = logging.getLogger(__name__)


class BarrierTimeout(RuntimeError):
    """A host did not reach a barrier in time. Retryable: a restart resumes from the newest checkpoint."""


def process_id_from_env(env: Mapping[str, str]) -> int:
    if api.ENV_PROCESS_ID in env:
        return _int_env(env, api.ENV_PROCESS_ID)
    if api.ENV_HOST_INDEX in env:
        return (_int_env(env, api.ENV_SLICE_INDEX, 0) * _int_env(env, api.ENV_HOSTS_PER_SLICE)
                + _int_env(env, api.ENV_HOST_INDEX))
    raise ConfigError("JAX_NUM_PROCESSES is set but neither JAX_PROCESS_ID nor SIMPO_HOST_INDEX is")


def num_slices(env: Mapping[str, str] = os.environ) -> int:
    """The job's slices (the operator sets SIMPO_NUM_SLICES on every pod; 1 when run by hand)."""
    return _int_env(env, api.ENV_NUM_SLICES, 1)


def initialize_from_env(init_timeout_s: int, env: Mapping[str, str] = os.environ) -> None:
    """Start jax.distributed as the environment says (a no-op for a single process), then check that it joined
    as many processes as the job has hosts."""
    _initialize(init_timeout_s, env)
    check_process_count(env)


def check_process_count(env: Mapping[str, str]) -> None:
    """A pod whose TPU environment is missing or wrong would train alone (or with the wrong hosts): refuse it at
    once, naming the expected and actual counts, rather than let the job hang or diverge."""
    if api.ENV_HOSTS_PER_SLICE not in env:
        return  # not started by a job (a single worker run by hand)
    expected = num_slices(env) * _int_env(env, api.ENV_HOSTS_PER_SLICE)
    if jax.process_count() != expected:
        raise ConfigError(f"jax.distributed has {jax.process_count()} process(es), the job has {expected} hosts "
                          f"({api.ENV_NUM_SLICES} x {api.ENV_HOSTS_PER_SLICE}): the TPU environment "
                          f"({api.ENV_TPU_WORKER_HOSTNAMES}, MEGASCALE_*) or {api.ENV_NUM_PROCESSES} is missing "
                          f"or wrong on this pod")


def _initialize(init_timeout_s: int, env: Mapping[str, str]) -> None:
    # Multi-process CPU (local runner, tests) needs gloo for cross-process collectives; no effect on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if api.ENV_TPU_WORKER_HOSTNAMES in env and api.ENV_COORDINATOR_ADDRESS not in env:
        jax.distributed.initialize(initialization_timeout=init_timeout_s)
        return
    num_processes = _int_env(env, api.ENV_NUM_PROCESSES, 1)
    if num_processes == 1:
        return
    coordinator = env.get(api.ENV_COORDINATOR_ADDRESS)
    if not coordinator:
        raise ConfigError(f"JAX_NUM_PROCESSES={num_processes} but JAX_COORDINATOR_ADDRESS is not set")
    process_id = process_id_from_env(env)
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is outside [0, {num_processes}) (JAX_NUM_PROCESSES)")
    log.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes, coordinator)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=init_timeout_s)


def is_leader() -> bool:
    return jax.process_index() == 0


def barrier(name: str, timeout_s: float) -> None:
    """Wait until every process arrives at `name` (unique per use), or raise BarrierTimeout naming the absent."""
    count = jax.process_count()
    if count == 1:
        return
    client = _client()
    me = jax.process_index()
    # Arrival marks let a timed-out host say which hosts never came.
    client.key_value_set(f"simpo/arrived/{name}/{me}", "1")
    try:
        client.wait_at_barrier(f"simpo/{name}", int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as error:
        arrived = {int(key.rsplit("/", 1)[-1]) for key, _ in client.key_value_dir_get(f"simpo/arrived/{name}/")}
        missing = sorted(set(range(count)) - arrived)
        raise BarrierTimeout(f"barrier {name!r}: host(s) {missing} did not arrive within {timeout_s:.0f}s "
                             f"(this is host {me} of {count}): {error}") from error


def _client():
    # The coordination-service client has the only barrier with a timeout; jax exposes no public wrapper.
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised but jax.process_count() > 1")
    return client


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ConfigError(f"environment variable {name}: expected an integer, got {raw!r}") from error


def exit_now(code: int) -> None:
    """Exit at once. A failing host must not run jax.distributed's atexit shutdown: it waits (up to minutes)
    for every other host at a shutdown barrier, which is exactly what a failure should not do."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
