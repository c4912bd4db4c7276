"""The operator's Prometheus metrics (prometheus-client) and the HTTP server of /metrics and /readyz.

Metric names follow Prometheus conventions: `simpo_operator_` prefix, seconds, `_total` counters. The default
registry also carries the client's process metrics (CPU seconds, resident memory, open fds) and Python's GC ones.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional

import kubernetes
import prometheus_client
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# A reconcile is a few API round trips: milliseconds normally, seconds when the API server is slow.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HANDLER_SECONDS = prometheus_client.Histogram(
    "simpo_operator_handler_duration_seconds", "Time one kopf handler call took (reconcile: a job's create, "
    "resume or spec change; jobset_changed: a JobSet's event).", ["handler"], buckets=LATENCY_BUCKETS)
HANDLER_ERRORS = prometheus_client.Counter(
    "simpo_operator_handler_errors_total", "Handler calls that raised (kopf retries them), by handler and reason "
    "(the exception's type, with the HTTP status for Kubernetes API errors).", ["handler", "reason"])
JOBSET_CREATE_SECONDS = prometheus_client.Histogram(
    "simpo_operator_jobset_create_latency_seconds", "From a SimpoInterleaveJob's creationTimestamp to the "
    "operator's JobSet for it created (creationTimestamp has 1 s resolution: up to 1 s more than the truth).",
    buckets=(0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0))
JOBSETS_CREATED = prometheus_client.Counter(
    "simpo_operator_jobsets_created_total", "JobSets the operator created (adopted ones are not counted).")
TRANSITIONS = prometheus_client.Counter(
    "simpo_operator_phase_transitions_total", "Phase transitions of SimpoInterleaveJobs the operator wrote.",
    ["phase", "reason"])
ACTIVE = prometheus_client.Gauge(
    "simpo_operator_active", "1 while this replica is the one serving events (kopf peering: the highest-priority "
    "live peer; standalone: always), 0 while it stands by.")
NO_PHASE = "New"  # a job the operator has not given a phase yet


class JobPhases(Collector):
    """`simpo_operator_jobs{phase}`: the watched SimpoInterleaveJobs by status.phase, kept from their events."""

    def __init__(self) -> None:
        self.phase_by_uid: dict[str, str] = {}

    def observe(self, uid: str, status: Optional[dict[str, Any]], deleted: bool) -> None:
        if deleted:
            self.phase_by_uid.pop(uid, None)
        else:
            self.phase_by_uid[uid] = (status or {}).get("phase") or NO_PHASE

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("simpo_operator_jobs", "SimpoInterleaveJobs the operator watches, by phase.",
                                   labels=["phase"])
        counts: dict[str, int] = {}
        for phase in self.phase_by_uid.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


JOB_PHASES = JobPhases()
prometheus_client.REGISTRY.register(JOB_PHASES)


def error_reason(error: BaseException) -> str:
    if isinstance(error, kubernetes.client.ApiException):
        return f"ApiException {error.status}"
    return type(error).__name__


@contextlib.contextmanager
def _timing(handler: str, histogram: prometheus_client.Histogram) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception as error:
        HANDLER_ERRORS.labels(handler, error_reason(error)).inc()
        raise
    finally:
        histogram.observe(time.perf_counter() - start)


def timed(handler: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Time a kopf handler (sync or async) into HANDLER_SECONDS and count what it raises in HANDLER_ERRORS.
    Put it below the kopf decorators: kopf registers what they receive."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        histogram = HANDLER_SECONDS.labels(handler)  # once, not per call
        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                with _timing(handler, histogram):
                    return await function(*args, **kwargs)
            return timed_async

        @functools.wraps(function)
        def timed_sync(*args: Any, **kwargs: Any) -> Any:
            with _timing(handler, histogram):
                return function(*args, **kwargs)
        return timed_sync
    return decorate


def jobset_created(job_creation_timestamp: Optional[str]) -> None:
    JOBSETS_CREATED.inc()
    if job_creation_timestamp:
        created = datetime.strptime(job_creation_timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        JOBSET_CREATE_SECONDS.observe(max(0.0, (datetime.now(timezone.utc) - created).total_seconds()))


async def serve(port: int, readiness: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]) -> web.AppRunner:
    """Serve GET /metrics (Prometheus text format) and GET /readyz (200 when `readiness` says ready, else 503;
    its details as a JSON body) on 0.0.0.0:`port`. Returns the runner, to clean up with."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def readyz(_: web.Request) -> web.Response:
        ready, details = await readiness()
        return web.Response(status=200 if ready else 503, text=json.dumps(details),
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner

