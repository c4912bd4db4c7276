"""Progress of the run, reported by the leader to the SimpoInterleaveJob's `status.progress`.

Best effort by design: a failed report is logged and training goes on. On Kubernetes the leader patches the
status subresource with its pod's service-account token (the worker Role allows exactly that); elsewhere
(local runner, tests) there is nothing to patch and reports only go to the log.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Mapping, Optional, Protocol

from simpo_worker.contract import api
from simpo_worker.contract.api import Progress

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ProgressReporter(Protocol):
    def report(self, progress: Progress) -> None: ...


class LogReporter:
    def report(self, progress: Progress) -> None:
        log.info("progress: %s", progress)


class KubernetesStatusReporter:
    """PATCH {apiserver}/apis/simpo.dev/v1alpha1/namespaces/{ns}/simpointerleavejobs/{name}/status."""

    def __init__(self, server: str, namespace: str, name: str, token: str, ca_file: Optional[str],
                 timeout_s: float = 5.0):
        self.url = f"{server}/apis/{api.API_VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}/status"
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.timeout_s = timeout_s

    def report(self, progress: Progress) -> None:
        progress = replace(progress, updateTime=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        LogReporter().report(progress)
        # Merge-patch: a None field (e.g. promptsDone while training) removes a stale value.
        body = json.dumps({"status": {"progress": asdict(progress)}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/merge-patch+json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                response.read()
        except urllib.error.HTTPError as error:
            log.warning("could not report progress to %s: HTTP %d: %s", self.url, error.code, _refusal(error))
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            log.warning("could not report progress to %s: %s", self.url, error)


def _refusal(error: urllib.error.HTTPError) -> str:
    """Why the API server refused (its Status message: e.g. which verb on which resource was forbidden)."""
    body = error.read().decode("utf-8", errors="replace")
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return body or str(error.reason)


def reporter_from_env(env: Mapping[str, str] = os.environ,
                      service_account_dir: str = SERVICE_ACCOUNT_DIR) -> ProgressReporter:
    """The Kubernetes reporter inside a pod of a SimpoInterleaveJob, else the log."""
    name, namespace = env.get(api.ENV_JOB_NAME), env.get(api.ENV_JOB_NAMESPACE)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token_file = os.path.join(service_account_dir, "token")
    if not (name and namespace and host and port):
        return LogReporter()
    if not os.path.exists(token_file):
        log.warning("no service-account token at %s (automountServiceAccountToken off?): status.progress of %s/%s "
                    "is not updated, progress goes to the log only", token_file, namespace, name)
        return LogReporter()
    with open(token_file, encoding="utf-8") as handle:
        token = handle.read().strip()
    ca_file = os.path.join(service_account_dir, "ca.crt")
    server = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
    return KubernetesStatusReporter(server, namespace, name, token, ca_file if os.path.exists(ca_file) else None)
