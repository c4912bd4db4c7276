"""`simpo-interleave operator` as a process: kubeconfig login, namespace selection, liveness, clean shutdown."""

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
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "simpo_interleave.cli", "operator", "--namespace", kube.namespace,
         "--liveness", f"http://127.0.0.1:{port}/healthz", "--log-level", "debug"],
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
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-4000:]
    assert "Client is configured via kubeconfig file" in output
