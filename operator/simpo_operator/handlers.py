"""kopf handlers: SimpoInterleaveJob -> ConfigMap + JobSet, and the JobSet's state -> the job's status.

- create / resume (operator restart) / spec update: validate, create or adopt the children (deterministic names,
  owner references; an existing child owned by this job is adopted, never duplicated), apply spec.suspend to the
  JobSet (not under Kueue: with spec.queueName the JobSet is created suspended and Kueue alone changes that), and
  set the status. An invalid spec is reported as Failed/InvalidSpec and nothing is created; a JobSet the API server
  refuses (invalid pod fields, a webhook's denial) fails the job as JobSetRefused, a ConfigMap as ConfigMapRefused.
- JobSet events: recompute the phase of the owning job and patch its status subresource (never status.progress,
  which the worker leader writes), with a Kubernetes event on every transition. A failed JobSet gets the failing
  host, its pod, its exit code and that code's meaning in the message (from the Job it names and its pods).
The phase fields are written from one place per situation, so two handlers never race on them: `reconcile` only
for a spec it rejects (nothing is created then), `jobset_changed` from the JobSet's state otherwise.
- ttlSecondsAfterFinished: the finished job is deleted; its children follow through owner references.
No finalizers: deletion cascades through owner references.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Optional

import kopf

from simpo_operator import kube, metrics, render, status as state
from simpo_operator.resource import FINISHED_PHASES, Job, validate_job
from simpo_worker.contract.api import GROUP, KIND, PLURAL, VERSION
from simpo_worker.contract.errors import ConfigError


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping out of the status: it belongs to the API (and status.progress to the worker). A
    # handler's progress (only kept while it retries) goes in annotations under a `kopf.` prefix: any other prefix
    # kopf marks with an annotation the first time it stores progress, a patch of every new job.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{GROUP}")
    settings.persistence.diffbase_storage = ObservedGenerationDiffBase()
    # Watch exact namespaces or the whole cluster: no CRD/namespace scanning, so no RBAC for it.
    settings.scanning.disabled = True
    # Our own events are posted explicitly; handler log lines below WARNING stay in the log only.
    settings.posting.level = logging.WARNING
    # reconcile's API calls block a thread each (kubernetes client): a thread per job of a 100-job burst, so none
    # waits for another's API calls to start its own (kube.CONNECTIONS; bench/README.md, operator_load.py).
    settings.execution.max_workers = kube.CONNECTIONS
    # The API client now, not in the first handlers: they would each build one at once, racing for the GIL with
    # the burst of events being dispatched (7 s for the first jobs of a 100-job burst).
    kube.warm_up()


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base (the last handled state, which tells a creation, an update of the spec and nothing new
    apart) as the spec's generation alone: the API server bumps it on every change of spec and on nothing else, and
    the last handled one is status.observedGeneration, which `reconcile` writes anyway. So only `field="spec"`
    handlers can be told apart, and kopf's diff says nothing but the generation (reconcile reads neither).

    kopf's default essence is a deep copy of each event's body (job and JobSet events alike: the operator's largest
    CPU cost under a burst of creations), and its stored copy of the handled one, an annotation, cost a patch of
    the job on every creation besides the status patch: a write the API server validates against the CRD's rules
    and a watch event back (bench/README.md, operator_load.py)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence(spec={"generation": body.metadata.get("generation")})

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        observed = body.status.get("observedGeneration")
        return None if observed is None else kopf.BodyEssence(spec={"generation": observed})

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass  # reconcile's status.observedGeneration is the record


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _post_transition(job: dict[str, Any], phase: state.Phase) -> None:
    metrics.TRANSITIONS.labels(phase.phase, phase.reason).inc()
    kopf.event(job, type=state.event_type(phase), reason=phase.phase,
               message=f"{phase.reason}: {phase.message}" if phase.message else phase.reason)


def _phase_patch(job: dict[str, Any], current: dict[str, Any], phase: state.Phase,
                 restarts: Optional[int], admitted: Optional[bool] = None) -> Optional[dict[str, Any]]:
    """The status patch for `phase` if it changes anything (None otherwise), posting an event on a transition."""
    if not state.is_transition(current, phase) and (restarts is None or current.get("restarts") == restarts):
        return None
    if state.is_transition(current, phase):
        _post_transition(job, phase)
    return state.status_patch(current, phase, now=_now(), generation=job["metadata"].get("generation"),
                              restarts=restarts, admitted=admitted)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@metrics.timed("reconcile")
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    resource = copy.deepcopy(dict(body))
    current = dict(resource.get("status") or {})
    if state.is_final(current):
        return  # a finished job is never run again, even if its JobSet is gone
    with _creations:
        started = _create_jobset(resource, current, patch, logger)
    if started is None:
        return
    job, jobset = started
    # The JobSet first, and the rest waits while other jobs' JobSets are being created (a burst of creations; see
    # CREATIONS_QUIET_S): the ConfigMap, and the status patch kopf makes when this returns (a write of the whole
    # job, which the API server validates again: 16% of its CPU under a burst of 100), took the API server from the
    # JobSet creations still waiting, whose latency is the one users see. The pods wait for the ConfigMap anyway.
    _creations.wait_quiet(CREATIONS_QUIET_S, CREATIONS_FIRST_S)
    configmap = render.render_configmap(job)
    try:
        existing_configmap, created = kube.create_or_adopt(configmap, job.uid)
    except kube.ChildConflictError as error:
        _fail(resource, current, patch, state.Phase("Failed", state.CHILD_CONFLICT, str(error)))
        return
    except kube.kubernetes.client.ApiException as error:
        _fail(resource, current, patch, _refusal(error, "ConfigMap", state.CONFIGMAP_REFUSED))
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
        _fail(resource, current, patch, _refusal(error, "JobSet", state.JOBSET_REFUSED))
        return None
    if created:
        metrics.jobset_created(resource["metadata"].get("creationTimestamp"))
    else:
        logger.info(f"adopted the existing JobSet {jobset['metadata']['name']}")
    return job, jobset


def _refusal(error: kube.kubernetes.client.ApiException, kind: str, reason: str) -> state.Phase:
    """The Failed phase for a child the API server refused; any other error is raised again (kopf retries it).
    Invalid (the API server's validation: the pod fields, a ConfigMap over 1 MiB) or denied (a webhook: JobSet's,
    Kueue's, a policy's): retrying the same child cannot succeed, and the fields behind it are immutable."""
    if error.status not in (400, 403, 422):
        raise error
    return state.Phase("Failed", reason, f"the API server refused the {kind}: {kube.api_message(error)}")


def _fail(resource: dict[str, Any], current: dict[str, Any], patch: kopf.Patch, phase: state.Phase) -> None:
    patch.status.update(_phase_patch(resource, current, phase, None) or {})
    patch.status["observedGeneration"] = resource["metadata"].get("generation")


class _InFlight:
    """How many `reconcile` calls are creating a JobSet, and a wait for none to have been for a moment."""

    def __init__(self) -> None:
        self.count = 0
        self.idle_since = time.monotonic()
        self.changed = threading.Condition()

    def __enter__(self) -> None:
        with self.changed:
            self.count += 1

    def __exit__(self, *_: Any) -> None:
        with self.changed:
            self.count -= 1
            if self.count == 0:
                self.idle_since = time.monotonic()
                self.changed.notify_all()

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Until no JobSet has been created for `quiet_s`, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while (now := time.monotonic()) < deadline:
                if self.count == 0 and now - self.idle_since >= quiet_s:
                    return
                until = self.idle_since + quiet_s if self.count == 0 else deadline
                self.changed.wait(min(until, deadline) - now)


_creations = _InFlight()
# How long the other API calls of a burst of creations wait for its JobSets before they go ahead anyway, and for how
# long none must have been created: a gap between two creations is no end of the burst, and the last JobSets'
# watch events (what users wait for) reach their watchers in that moment, not behind the writes held back.
CREATIONS_FIRST_S, CREATIONS_QUIET_S = 2.0, 0.25

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
    _creations.wait_quiet(CREATIONS_QUIET_S, CREATIONS_FIRST_S)
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
    patch = _phase_patch(job, current, phase, jobset.get("status", {}).get("restarts") or 0, state.admitted(jobset))
    if patch is not None:
        logger.info(f"{KIND} {owner['name']}: {current.get('phase')} -> {phase.phase} ({phase.reason})")
        kube.patch_job_status(namespace, owner["name"], patch)


# ttlSecondsAfterFinished: one timer per finished job, armed from its events (the initial listing re-arms them
# after an operator restart), so no finalizer or polling is needed.
_expiry_timers: dict[str, asyncio.TimerHandle] = {}
_expiry_tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly: keep them until done
EXPIRY_RETRY_S = 30


def expiry_delay(resource: dict[str, Any], now: datetime) -> Optional[float]:
    """Seconds until a finished job with ttlSecondsAfterFinished is due for deletion; None if it never is."""
    ttl = (resource.get("spec") or {}).get("ttlSecondsAfterFinished")
    status = resource.get("status") or {}
    if ttl is None or status.get("phase") not in FINISHED_PHASES or not status.get("completionTime"):
        return None
    finished = datetime.strptime(status["completionTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max(0.0, (finished - now).total_seconds() + ttl)


@kopf.on.event(GROUP, VERSION, PLURAL)
@metrics.timed("expire_finished")
async def expire_finished(body: kopf.Body, type: Optional[str], logger: logging.Logger, **_: Any) -> None:
    uid = body.metadata.uid
    # Every job event passes here: one handler, as each costs kopf's dispatch on the event loop.
    metrics.JOB_PHASES.observe(uid, body.get("status"), deleted=type == "DELETED")
    if type == "DELETED":
        timer = _expiry_timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        return
    # Read-only: no copy of the whole body (its config is large) on every event.
    delay = expiry_delay({"spec": body.spec, "status": body.status}, datetime.now(timezone.utc))
    if delay is None or uid in _expiry_timers:
        return
    namespace, name = body.metadata.namespace, body.metadata.name
    logger.info(f"finished; deleting in {delay:.0f}s (ttlSecondsAfterFinished)")
    loop = asyncio.get_running_loop()

    def start_expiry() -> None:
        task = loop.create_task(_expire(namespace, name, uid, logger))
        _expiry_tasks.add(task)
        task.add_done_callback(_expiry_tasks.discard)

    _expiry_timers[uid] = loop.call_later(delay, start_expiry)


async def _expire(namespace: str, name: str, uid: str, logger: logging.Logger) -> None:
    while True:
        try:
            await asyncio.to_thread(kube.delete_job, namespace, name, uid)
            return
        except kube.kubernetes.client.ApiException as error:
            logger.error(f"ttlSecondsAfterFinished: deleting {namespace}/{name} failed ({error.status} "
                         f"{error.reason}); retrying in {EXPIRY_RETRY_S}s")
            await asyncio.sleep(EXPIRY_RETRY_S)
