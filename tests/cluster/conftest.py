"""Fixtures for the cluster tier: one real control plane per test session, a fresh namespace per test."""
import uuid

import pytest

from control_plane import ControlPlane
from operator_process import HelmRelease, OperatorProcess


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> ControlPlane:
    control_plane = ControlPlane(tmp_path_factory.mktemp("cluster")).start()
    yield control_plane
    control_plane.stop()


@pytest.fixture
def namespace(cluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def chart(cluster) -> HelmRelease:
    return HelmRelease(cluster).install()


@pytest.fixture(scope="session")
def operator(cluster, chart) -> OperatorProcess:
    running = OperatorProcess(cluster).start()
    yield running
    running.stop()
