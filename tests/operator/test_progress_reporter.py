"""The worker leader's progress reporter (simpo_worker.observe.progress) against an API server: best effort, so a report
that fails is logged with the reason, never raised (training goes on) and never dropped without a word.
(tests/cluster runs it with a real service-account token against a real kube-apiserver.)"""

from __future__ import annotations

import logging

from simpo_interleave.host_processes import free_port
from simpo_worker.contract import api
from simpo_worker.contract.api import Progress
from simpo_worker.observe.progress import KubernetesStatusReporter, LogReporter, reporter_from_env

PROGRESS = Progress(stage="train", step=3, totalSteps=7)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "simpo_worker.observe.progress" and r.levelno == logging.WARNING]


def test_a_refused_report_is_logged_with_the_api_servers_reason(kube_client, caplog):
    reporter = KubernetesStatusReporter(kube_client.client.configuration.host, kube_client.namespace, "missing",
                                        token="test-token", ca_file=None)
    reporter.report(PROGRESS)  # returns: training goes on
    [warning] = warnings(caplog)
    assert warning.startswith(f"could not report progress to {reporter.url}: HTTP 404: ")
    assert 'simpointerleavejobs "missing" not found' in warning


def test_an_unreachable_api_server_is_logged(caplog):
    reporter = KubernetesStatusReporter(f"http://127.0.0.1:{free_port()}", "jobs", "tiny", token="t", ca_file=None,
                                        timeout_s=2)
    reporter.report(PROGRESS)
    [warning] = warnings(caplog)
    assert warning.startswith(f"could not report progress to {reporter.url}: ") and "refused" in warning


POD_ENV = {api.ENV_JOB_NAME: "tiny", api.ENV_JOB_NAMESPACE: "jobs", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
           "KUBERNETES_SERVICE_PORT": "443"}


def test_a_pod_reports_to_its_api_server_with_its_token(tmp_path):
    (tmp_path / "token").write_text("the-token\n")
    reporter = reporter_from_env(POD_ENV, service_account_dir=str(tmp_path))
    assert isinstance(reporter, KubernetesStatusReporter) and reporter.token == "the-token"
    assert reporter.url == ("https://10.0.0.1:443/apis/simpo.dev/v1alpha1/namespaces/jobs/simpointerleavejobs/tiny/"
                            "status")
    ipv6 = reporter_from_env({**POD_ENV, "KUBERNETES_SERVICE_HOST": "fd00::1"}, service_account_dir=str(tmp_path))
    assert ipv6.url.startswith("https://[fd00::1]:443/")


def test_a_pod_without_its_token_says_progress_goes_to_the_log_only(tmp_path, caplog):
    assert isinstance(reporter_from_env(POD_ENV, service_account_dir=str(tmp_path)), LogReporter)
    [warning] = warnings(caplog)
    assert f"no service-account token at {tmp_path}/token" in warning and "jobs/tiny" in warning
    # Outside a pod (local runner, tests) the log is the only place, and that is no news.
    caplog.clear()
    assert isinstance(reporter_from_env({api.ENV_JOB_NAME: "tiny", api.ENV_JOB_NAMESPACE: "jobs"},
                                        service_account_dir=str(tmp_path)), LogReporter)
    assert not warnings(caplog)
