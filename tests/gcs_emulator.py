"""A GCS emulator speaking the JSON API on loopback, reached through gcsfs exactly like real GCS."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

from simpo_operator.host_processes import free_port

BUCKET = "simpo-test"


@contextlib.contextmanager
def gcs_emulator(timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Start the emulator; yield the environment that points gcsfs (and our processes) at it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"GCS emulator did not start on port {port} (exit code {process.poll()})")
            time.sleep(0.1)
        yield {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            # fsspec reads FSSPEC_<PROTOCOL>_<KWARG>: anonymous credentials, as the emulator wants.
            "FSSPEC_GS_TOKEN": "anon",
            # gcsfs probes the bucket layout over gRPC (storage control API), which the emulator lacks.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
