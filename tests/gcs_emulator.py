"""A GCS emulator on loopback: fake-gcs-server (built with the control plane, version pinned in pyproject.toml),
speaking the GCS JSON API, reached through gcsfs exactly like real GCS. `fault_proxy` sits in front of it to
answer chosen requests with GCS's error statuses (an outage, throttling, a refused permission)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
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
            # tensorstore (Orbax's array writes) has its own GCS client: the emulator's URL, and a fixed bearer
            # token instead of Google's credential discovery (the emulator checks none).
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def point_this_process_at(env: dict[str, str], monkeypatch) -> None:
    """This process's environment and fsspec's config pointed at an emulator (`gcs_emulator`'s env, or a proxy's);
    the monkeypatch undoes both."""
    import fsspec.config
    from etils import epath

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    # etils.epath (Orbax's paths) keeps its first gcsfs instance, made for an earlier emulator's port.
    type(epath.Path("gs://bucket/path")._backend)._get_filesystem.cache_clear()


@dataclass
class Request:
    method: str
    path: str
    body_bytes: int
    status: int


@dataclass
class FaultProxy:
    """Forwards every request to the emulator, except that the next requests matching a planned fault get that
    fault's statuses instead, one each, with a GCS error body. Records every request it saw."""

    url: str
    seen: list[Request] = field(default_factory=list)
    _faults: list[tuple[str, str, list[int]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, method: str, path_contains: str, statuses: list[int]) -> None:
        with self._lock:
            self._faults.append((method, path_contains, list(statuses)))

    def requests(self, method: str, path_contains: str) -> list[Request]:
        with self._lock:
            return [r for r in self.seen if r.method == method and path_contains in urllib.parse.unquote(r.path)]

    def _planned_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for wanted, part, statuses in self._faults:
                if wanted == method and part in urllib.parse.unquote(path) and statuses:
                    return statuses.pop(0)
        return None


@contextlib.contextmanager
def fault_proxy(env: dict[str, str]) -> Iterator[tuple[FaultProxy, dict[str, str]]]:
    """A FaultProxy in front of the emulator of `env`; yields it and the environment that points gcsfs at it."""
    target = urllib.parse.urlsplit(env["STORAGE_EMULATOR_HOST"])
    port = free_port()
    proxy = FaultProxy(f"http://127.0.0.1:{port}")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as gcsfs's aiohttp session expects

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = proxy._planned_status(self.command, self.path)
            if status is not None:
                data = json.dumps({"error": {"code": status, "message": f"injected HTTP {status}"}}).encode()
                headers = [("Content-Type", "application/json")]
            else:
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    connection.request(self.command, self.path, body=body or None, headers=forwarded)
                    response = connection.getresponse()
                    status, data = response.status, response.read()
                    headers = [(k, v) for k, v in response.getheaders()
                               if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                finally:
                    connection.close()
            with proxy._lock:
                proxy.seen.append(Request(self.command, self.path, len(body), status))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
            pass  # the test reads `seen`, not a log

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy, {**env, "STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
