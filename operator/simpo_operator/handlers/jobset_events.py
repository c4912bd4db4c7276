"""The JobSet's state -> the owning job's status: recompute the phase and patch the status subresource (never
status.progress, which the worker leader writes), with a Kubernetes event on every transition. A failed JobSet
gets the failing host, its pod, its exit code and that code's meaning in the message (from the Job it names and
its pods).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from typing import Any, Optional

import kopf

from simpo_operator import kube, metrics, render, status as state
from simpo_operator.handlers.creation_burst import CREATIONS_FIRST_S, CREATIONS_QUIET_S, creations
from simpo_operator.handlers.phase import phase_patch
from simpo_worker.contract.api import KIND


# JobSet events (several per job) block on API calls in threads of their own: in kopf's pool, which runs
# `reconcile`, a burst of them would queue the creation of the next jobs' JobSets behind them.
_jobset_event_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="jobset-events")


@kopf.on.event(kube.JOBSET_GROUP, kube.JOBSET_VERSION, kube.JOBSET_PLURAL, labels={render.JOB_LABEL: kopf.PRESENT})
@metrics.timed("jobset_changed")
async def jobset_changed(body: kopf.Body, type: Optional[str], logger: logging.Logger, **_: Any) -> None:
    # In kopf's context (kopf.event needs it), as asyncio.to_thread does for the default pool.
    await asyncio.get_running_loop().run_in_executor(_jobset_event_pool, contextvars.copy_context().run,
                                                     _jobset_changed, body, type, logger)


def _jobset_changed(body: kopf.Body, type: Optional[str], logger: logging.Logger) -> None:
    if type == "DELETED":
        return  # deleted with its job (owner references), or by hand: the job keeps its last status
    # Creations first: under a burst of them, the status work of the JobSets already created (a GET and a status
    # patch each, more writes for the API server) took the CPU and the API server from the creations still
    # waiting, whose latency is the one users see. The phase follows a moment later; the event it acts on is the
    # one it got (kopf passes each event's body), so nothing is lost by waiting.
    creations.wait_quiet(CREATIONS_QUIET_S, CREATIONS_FIRST_S)
    jobset = dict(body)  # read only: no deep copy of each event's body
    owner = next((ref for ref in jobset["metadata"].get("ownerReferences") or []
                  if ref.get("kind") == KIND and ref.get("controller")), None)
    if owner is None:
        return
    namespace = jobset["metadata"]["namespace"]
    job = kube.get_job(namespace, owner["name"])
    if job is None or job["metadata"].get("uid") != owner["uid"]:
        return  # its job is gone; garbage collection removes this JobSet
    current = job.get("status") or {}
    if state.is_final(current):
        return
    phase = state.phase_of(jobset, bool(job.get("spec", {}).get("suspend")))
    failed_job = state.first_failed_job(phase) if state.is_transition(current, phase) else None
    if failed_job is not None:
        # Which host failed it, with which exit code and what that means (bad data, out of memory ...): from the
        # Job it names and that Job's pods.
        batch_job = kube.get_batch_job(namespace, failed_job)
        pods = kube.list_job_pods(batch_job) if batch_job is not None else []
        phase = state.with_failed_host(phase, state.failed_host(batch_job, pods), state.slice_count(jobset))
    patch = phase_patch(job, current, phase, jobset.get("status", {}).get("restarts") or 0, state.admitted(jobset))
    if patch is not None:
        logger.info(f"{KIND} {owner['name']}: {current.get('phase')} -> {phase.phase} ({phase.reason})")
        kube.patch_job_status(namespace, owner["name"], patch)

