"""Fixtures for the operator tests: the reference job, and for the handler tests an API server and a client."""

from __future__ import annotations

import os
import tempfile

# The kubernetes client reads $KUBECONFIG once, when first imported (kopf's login uses that default): point it at
# the test API server's kubeconfig before anything imports it.
KUBECONFIG = os.environ.get("SIMPO_TEST_KUBECONFIG") or os.path.join(tempfile.mkdtemp(prefix="simpo-kube-"),
                                                                     "kubeconfig")
os.environ["KUBECONFIG"] = KUBECONFIG

import kubernetes  # noqa: E402

# In a full run another tier may have imported it first (its default then is the old $KUBECONFIG).
kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = KUBECONFIG

import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from inmemory_apiserver import ApiServer  # noqa: E402
from operator_testkit import REFERENCE_JOB, Kube  # noqa: E402


@pytest.fixture
def reference_job() -> dict[str, Any]:
    return yaml.safe_load(REFERENCE_JOB.read_text())


# ---- handler tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """The API server the handler tests talk to: in memory here; $SIMPO_TEST_KUBECONFIG points them at a real
    control plane (with the CRD installed) instead."""
    if os.environ.get("SIMPO_TEST_KUBECONFIG"):
        yield Path(KUBECONFIG)
        return
    server = ApiServer().start()
    Path(KUBECONFIG).write_text(server.kubeconfig())
    yield Path(KUBECONFIG)
    server.stop()


@pytest.fixture
def kube_client(kubeconfig) -> Kube:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    client = Kube(kubeconfig, namespace)
    client.core.create_namespace({"metadata": {"name": namespace}})
    return client
