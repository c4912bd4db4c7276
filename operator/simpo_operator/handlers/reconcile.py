"""SimpoInterleaveJob -> ConfigMap + JobSet, on create, resume (operator restart) and spec update.

Validate, create or adopt the children (deterministic names, owner references; an existing child owned by this job
is adopted, never duplicated), apply spec.suspend to the JobSet (not under Kueue: with spec.queueName the JobSet is
created suspended and Kueue alone changes that), and set the status. An invalid spec is reported as
Failed/InvalidSpec and nothing is created; a JobSet the API server refuses (invalid pod fields, a webhook's denial)
fails the job as JobSetRefused, a ConfigMap as ConfigMapRefused. The phase otherwise follows from the JobSet's
events (handlers.jobset_events).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import kopf

from simpo_operator import kube, metrics, render, status as state
from simpo_operator.handlers.creation_burst import CREATIONS_FIRST_S, CREATIONS_QUIET_S, creations
from simpo_operator.handlers.phase import phase_patch
from simpo_operator.resource import Job, validate_job
from simpo_worker.contract.api import GROUP, PLURAL, VERSION
from simpo_worker.contract.errors import ConfigError


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@metrics.timed("reconcile")
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    resource = copy.deepcopy(dict(body))
    current = dict(resource.get("status") or {})
    if state.is_final(current):
        return  # a finished job is never run again, even if its JobSet is gone
    with creations:
        started = _create_jobset(resource, current, patch, logger)
    if started is None:
        return
    job, jobset = started
    # The JobSet first, and the rest waits while other jobs' JobSets are being created (a burst of creations; see
    # CREATIONS_QUIET_S): the ConfigMap, and the status patch kopf makes when this returns (a write of the whole
    # job, which the API server validates again: 16% of its CPU under a burst of 100), took the API server from the
    # JobSet creations still waiting, whose latency is the one users see. The pods wait for the ConfigMap anyway.
    creations.wait_quiet(CREATIONS_QUIET_S, CREATIONS_FIRST_S)
    configmap = render.render_configmap(job)
    try:
        existing_configmap, created = kube.create_or_adopt(configmap, job.uid)
    except kube.ChildConflictError as error:
        _fail(resource, current, patch, state.Phase("Failed", state.CHILD_CONFLICT, str(error)))
        return
    except kube.kubernetes.client.ApiException as error:
        _fail(resource, current, patch, refusal(error, "ConfigMap", state.CONFIGMAP_REFUSED))
        return
    if not created and existing_configmap.get("data") != configmap["data"]:
        kopf.warn(resource, reason="ConfigChangeIgnored",
                  message="spec.config changed after the job was created; the running job keeps its "
                          "original config (create a new job to change it)")
    # Under Kueue, Kueue alone suspends (queues, preempts) and unsuspends (admits) the JobSet.
    if job.spec.queueName is None and bool(jobset.get("spec", {}).get("suspend")) != job.spec.suspend:
        kube.set_jobset_suspend(job.namespace, jobset["metadata"]["name"], job.spec.suspend)
    # The phase follows from the JobSet's events (jobset_changed); here only what this handler knows.
    children = {"jobSetName": render.jobset_name(job.name), "outputDir": job.spec.config.output_dir,
                "hosts": job.num_processes, "observedGeneration": resource["metadata"].get("generation")}
    patch.status.update({key: value for key, value in children.items() if current.get(key) != value})


def _create_jobset(resource: dict[str, Any], current: dict[str, Any], patch: kopf.Patch,
                   logger: logging.Logger) -> Optional[tuple[Job, dict[str, Any]]]:
    """Validate the job and create its JobSet, or adopt it: (job, JobSet), or None if the job failed instead."""
    try:
        job = validate_job(resource)
    except ConfigError as error:
        logger.warning(f"invalid spec: {error}")
        _fail(resource, current, patch, state.Phase("Failed", state.INVALID_SPEC, str(error)))
        return None
    try:
        jobset, created = kube.create_or_adopt(render.render_jobset(job), job.uid)
    except kube.ChildConflictError as error:
        _fail(resource, current, patch, state.Phase("Failed", state.CHILD_CONFLICT, str(error)))
        return None
    except kube.kubernetes.client.ApiException as error:
        _fail(resource, current, patch, refusal(error, "JobSet", state.JOBSET_REFUSED))
        return None
    if created:
        metrics.jobset_created(resource["metadata"].get("creationTimestamp"))
    else:
        logger.info(f"adopted the existing JobSet {jobset['metadata']['name']}")
    return job, jobset


def refusal(error: kube.kubernetes.client.ApiException, kind: str, reason: str) -> state.Phase:
    """The Failed phase for a child the API server refused; any other error is raised again (kopf retries it).
    Invalid (the API server's validation: the pod fields, a ConfigMap over 1 MiB) or denied (a webhook: JobSet's,
    Kueue's, a policy's): retrying the same child cannot succeed, and the fields behind it are immutable."""
    if error.status not in (400, 403, 422):
        raise error
    return state.Phase("Failed", reason, f"the API server refused the {kind}: {kube.api_message(error)}")


def _fail(resource: dict[str, Any], current: dict[str, Any], patch: kopf.Patch, phase: state.Phase) -> None:
    patch.status.update(phase_patch(resource, current, phase, None) or {})
    patch.status["observedGeneration"] = resource["metadata"].get("generation")

