"""`simpo-interleave operator` as a process: kubeconfig login, namespace selection, liveness, readiness, metrics,
clean shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from operator_testkit import make_job, wait_for

pytestmark = pytest.mark.timeout(120)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_command_serves_its_namespace_and_answers_liveness(kube_client, kubeconfig):
    kube = kube_client
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "simpo_interleave.cli", "operator", "--namespace", kube.namespace,
         "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", str(metrics_port),
         "--log-level", "debug"],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        kube.create_job(make_job("cmd"))
        wait_for(lambda: kube.jobset("cmd"), "the operator process to create the JobSet", timeout_s=60)

        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False
        wait_for(healthy, "the liveness endpoint")
        # Standalone (no peering): ready once started, and the active one.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"ready": True, "role": "active", "peering": None}
        def exposition():
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
            return text if 'simpo_operator_handler_duration_seconds_count{handler="reconcile"} 1.0' in text else None
        exposition = wait_for(exposition, "the reconcile to be counted")
        assert "simpo_operator_jobsets_created_total 1.0" in exposition
        assert "simpo_operator_jobset_create_latency_seconds_count 1.0" in exposition
        assert "simpo_operator_active 1.0" in exposition
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-4000:]
    assert "Client is configured via kubeconfig file" in output
