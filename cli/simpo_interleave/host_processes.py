"""Run N host processes locally as one job: logs streamed with host prefixes, the first failure stops the rest.

This is what the JobSet does on a cluster (all pods or none), for the local runner and multi-process tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

# Returned when the whole job ran past its deadline (as `timeout` does).
EXIT_TIMEOUT = 124
_GRACE_S = 10.0


def run_host_processes(argv: Sequence[str], host_envs: Sequence[Mapping[str, str]], timeout_s: float,
                       out: TextIO | None = None, cwd: str | None = None) -> int:
    """Start one process per env; return 0 if all succeed, else the exit code of the first host that failed.
    Host output goes to `out` (default: the sys.stdout of the moment, which may have been redirected)."""
    out = sys.stdout if out is None else out
    processes = []
    pumps = []
    try:
        for host, env in enumerate(host_envs):
            process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace",
                                       start_new_session=True)
            processes.append(process)
            pump = threading.Thread(target=_pump, args=(process.stdout, f"[host {host}] ", out), daemon=True)
            pump.start()
            pumps.append(pump)
        return _wait(processes, timeout_s, out)
    finally:
        _stop(processes)
        for pump in pumps:
            pump.join(timeout=_GRACE_S)


def _wait(processes: list[subprocess.Popen], timeout_s: float, out: TextIO) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [process.poll() for process in processes]
        failed = [(host, code) for host, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            host, code = failed[0]
            running = [h for h, c in enumerate(codes) if c is None]
            print(f"host {host} exited with code {code}; stopping hosts {running}", file=out, flush=True)
            return code
        if all(code == 0 for code in codes):
            return 0
        if time.monotonic() > deadline:
            running = [h for h, c in enumerate(codes) if c is None]
            print(f"hosts {running} still running after {timeout_s:.0f}s: stopping all", file=out, flush=True)
            return EXIT_TIMEOUT
        time.sleep(0.2)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each live process group, then SIGKILL what is left after a grace period."""
    live = [p for p in processes if p.poll() is None]
    for process in live:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for process in live:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=_GRACE_S)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # already gone


def _pump(stream: TextIO, prefix: str, out: TextIO) -> None:
    for line in stream:
        out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        out.flush()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

