"""The operator's operations surface: Prometheus metrics, the readiness convention, the peering priorities, and
the API calls' timeouts."""

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import kubernetes
import prometheus_client
import pytest
import urllib3
import yaml

from simpo_operator import kube, metrics, peering

NOW = datetime(2026, 12, 2, 6, 0, 0, tzinfo=timezone.utc)


def record(priority: int, seconds_ago: float, lifetime: int = peering.LIFETIME_S) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat()}


def test_the_highest_priority_live_peer_is_active_and_the_others_stand_by():
    peers = {"old": record(900, 1), "new": record(100, 0.5)}
    assert peering.role(peers, "old", NOW) == "active"
    assert peering.role(peers, "new", NOW) == "standby"
    # The active one died without saying so: its record outlives it by LIFETIME_S, then the standby takes over.
    died = {"old": record(900, peering.LIFETIME_S - 0.5), "new": record(100, 0.5)}
    assert peering.role(died, "new", NOW) == "standby"
    expired = {"old": record(900, peering.LIFETIME_S + 0.5), "new": record(100, 0.5)}
    assert peering.role(expired, "new", NOW) == "active"
    # A tie pauses every kopf operator: it is never "active" for either.
    assert peering.role({"a": record(5, 0), "b": record(5, 0)}, "a", NOW) == "standby"
    # Not in the peering object (not connected yet, or its own record expired): no role, so not ready.
    assert peering.role(peers, "third", NOW) is None
    assert peering.role({"me": record(1, peering.LIFETIME_S + 1)}, "me", NOW) is None
    assert peering.role({}, "me", NOW) is None


def test_seniority_priority_orders_by_start_time_and_breaks_ties():
    started = 1_796_000_000
    assert peering.seniority_priority(started) > peering.seniority_priority(started + 1)
    assert len({peering.seniority_priority(started) for _ in range(50)}) > 40  # random low digits
    assert peering.seniority_priority(started) < 2 ** 53  # exact as a JSON number


def sample(name: str, labels: dict) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_timed_handlers_record_durations_and_errors_by_reason():
    @metrics.timed("t_sync")
    def sync_handler(fail: bool = False, **_):
        if fail:
            raise kubernetes.client.ApiException(status=409, reason="Conflict")
        return "ok"

    @metrics.timed("t_async")
    async def async_handler(**_):
        raise ValueError("bad")

    assert asyncio.iscoroutinefunction(async_handler) and not asyncio.iscoroutinefunction(sync_handler)
    assert sync_handler.__name__ == "sync_handler"  # kopf names handlers after their function
    assert sync_handler() == "ok"
    with pytest.raises(kubernetes.client.ApiException):
        sync_handler(fail=True)
    with pytest.raises(ValueError):
        asyncio.run(async_handler())
    assert sample("simpo_operator_handler_duration_seconds_count", {"handler": "t_sync"}) == 2
    assert sample("simpo_operator_handler_duration_seconds_count", {"handler": "t_async"}) == 1
    assert sample("simpo_operator_handler_errors_total", {"handler": "t_sync", "reason": "ApiException 409"}) == 1
    assert sample("simpo_operator_handler_errors_total", {"handler": "t_async", "reason": "ValueError"}) == 1


def test_jobs_by_phase_follow_their_events():
    phases = metrics.JobPhases()
    phases.observe("a", None, deleted=False)
    phases.observe("b", {"phase": "Running"}, deleted=False)
    phases.observe("c", {"phase": "Running"}, deleted=False)
    phases.observe("c", {"phase": "Succeeded"}, deleted=False)
    phases.observe("b", {"phase": "Running"}, deleted=True)
    [family] = phases.collect()
    assert {s.labels["phase"]: s.value for s in family.samples} == {"New": 1, "Succeeded": 1}


def test_http_server_serves_metrics_and_readiness():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = {"ready": False}

    async def readiness():
        return state["ready"], {"ready": state["ready"]}

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    async def scenario():
        runner = await metrics.serve(port, readiness)
        try:
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(None, get, "/readyz")
            assert status == 503 and json.loads(body) == {"ready": False}
            state["ready"] = True
            status, _ = await loop.run_in_executor(None, get, "/readyz")
            assert status == 200
            status, body = await loop.run_in_executor(None, get, "/metrics")
            assert status == 200
            assert "# TYPE simpo_operator_handler_duration_seconds histogram" in body
            assert "# TYPE simpo_operator_jobs gauge" in body and "process_resident_memory_bytes" in body
        finally:
            await runner.cleanup()
    asyncio.run(scenario())


def test_every_api_call_gives_up_on_a_server_that_never_answers(tmp_path, monkeypatch):
    silent = socket.socket()  # listens (the kernel completes the handshakes) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "silent",
        "clusters": [{"name": "silent", "cluster": {"server": f"http://127.0.0.1:{silent.getsockname()[1]}"}}],
        "users": [{"name": "silent", "user": {"token": "t"}}],
        "contexts": [{"name": "silent", "context": {"cluster": "silent", "user": "silent"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT_S", (1, 0.5))
    kube.api_client.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError, match="timed out"):
            kube.get_job("jobs", "tiny")
        # urllib3 retries an idempotent read 3 times: 4 reads of 0.5 s, not forever.
        assert time.monotonic() - start < 10
    finally:
        kube.api_client.cache_clear()
        silent.close()
