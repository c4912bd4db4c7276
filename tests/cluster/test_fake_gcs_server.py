"""fake-gcs-server (built with the control plane) speaks the GCS JSON API that gcsfs, the worker's GCS path, uses."""
import urllib.request

import pytest
# The JSON-API filesystem; gcsfs's default wrapper also probes bucket layouts over gRPC, which emulators lack (the
# project's processes get the same class through GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, see tests/gcs_emulator.py).
from gcsfs.core import GCSFileSystem

import build_control_plane
from control_plane import Process, free_port, wait_for


@pytest.fixture
def fake_gcs(tmp_path) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Process("fake-gcs-server", [
        str(build_control_plane.built_dir() / "fake-gcs-server"), "-scheme", "http", "-host", "127.0.0.1",
        "-port", str(port), "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-external-url", url,
        "-log-level", "warn"], tmp_path).start()
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).status == 200, 30,
                 "fake-gcs-server", (server,))
        yield url
    finally:
        server.stop()


def test_gcsfs_writes_lists_and_reads_back(fake_gcs):
    fs = GCSFileSystem(endpoint_url=fake_gcs, token="anon", skip_instance_cache=True)
    fs.mkdir("outputs")
    rows = b'{"step": 2, "completion": "hi"}\n' * 3
    with fs.open("outputs/run/inference/step_000002/host_0000_of_0002.jsonl", "wb") as f:
        f.write(rows)
    assert fs.ls("outputs/run/inference/step_000002") == ["outputs/run/inference/step_000002/host_0000_of_0002.jsonl"]
    assert fs.cat("outputs/run/inference/step_000002/host_0000_of_0002.jsonl") == rows
