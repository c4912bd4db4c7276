"""A GCS emulator on loopback: fake-gcs-server (built with the control plane, version pinned in pyproject.toml),
speaking the GCS JSON API, reached through gcsfs exactly like real GCS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from typing import Iterator

from cluster.build_control_plane import built_dir
from simpo_interleave.host_processes import free_port

BUCKET = "simpo-test"


@contextlib.contextmanager
def gcs_emulator(timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Start the emulator with one bucket; yield the environment that points gcsfs (and our processes) at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(built_dir() / "fake-gcs-server"), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on port {port} (exit code {process.poll()})")
                time.sleep(0.1)
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass
        yield {
            "STORAGE_EMULATOR_HOST": url,
            # fsspec reads FSSPEC_<PROTOCOL>_<KWARG>: anonymous credentials, as the emulator wants.
            "FSSPEC_GS_TOKEN": "anon",
            # gcsfs probes the bucket layout over gRPC (storage control API), which the emulator lacks.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
