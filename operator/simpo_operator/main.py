"""`simpo-interleave operator`: run the kopf operator (the handlers in simpo_operator.handlers).

Auth is kopf's login: the pod's service account in a cluster, else the current kubeconfig context. One replica
runs standalone (no peering objects, so no RBAC for them); `--peering NAME` enables kopf peering for several: one
active, the others standing by (simpo_operator.peering).

`--metrics-port` serves GET /metrics (Prometheus) and GET /readyz. Ready means: kopf's startup is done and, with
peering, this replica's keepalive is in the peering object, so it is connected and has a role, active or standby
(the JSON body says which, and the `simpo_operator_active` gauge). A standby is ready too: it is what takes over,
and a rolling update waits for new pods to be ready; "is it the active one" is the gauge's question.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
from typing import Any, Optional

import kopf

from simpo_operator import kube, metrics, peering

LOG_LEVELS = ("debug", "info", "warning")


def _namespaces_from_env() -> list[str]:
    # The chart passes the watched namespaces as one comma-separated variable.
    return [name.strip() for name in os.environ.get("SIMPO_WATCH_NAMESPACES", "").split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=None,
                        help="watch this namespace (repeatable; default: $SIMPO_WATCH_NAMESPACES, else all)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL (empty: none)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="serve /metrics (Prometheus) and /readyz on this port (0: neither)")
    parser.add_argument("--peering", metavar="NAME", default=os.environ.get("SIMPO_PEERING") or None,
                        help="enable kopf peering under this name, for several replicas (default: $SIMPO_PEERING, "
                             "else standalone)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=os.environ.get("SIMPO_LOG_LEVEL", "info"))


class Readiness:
    """What /readyz answers and `simpo_operator_active` shows (module docstring)."""

    def __init__(self, peering_name: Optional[str], namespaces: list[str], identity: str):
        self.peering_name, self.identity = peering_name, identity
        # kopf keeps the same peers' records in every served namespace: the first one tells.
        self.peering_namespace = namespaces[0] if namespaces else None
        self.started = threading.Event()  # kopf sets it when its startup handlers are done

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        if not self.started.is_set():
            return False, {"ready": False, "reason": "starting"}
        if self.peering_name is None:
            metrics.ACTIVE.set(1)
            return True, {"ready": True, "role": "active", "peering": None}
        peers = await asyncio.to_thread(kube.get_peers, self.peering_name, self.peering_namespace)
        role = peering.role(peers, self.identity)
        metrics.ACTIVE.set(1 if role == "active" else 0)
        details = {"ready": role is not None, "role": role, "peering": self.peering_name, "identity": self.identity}
        if role is None:
            details["reason"] = "no live record of this replica in the peering object yet"
        return role is not None, details


def _not_a_handler_success(record: logging.LogRecord) -> bool:
    # kopf logs "Handler 'x' succeeded." at INFO for every handler call, i.e. for every JobSet and job event: the
    # bulk of the log under load, and of its cost. "Creation/Update is processed" lines still say it.
    return not (record.levelno == logging.INFO and record.getMessage().endswith("' succeeded.")
                and record.getMessage().startswith("Handler '"))


def run(args: argparse.Namespace) -> int:
    kopf.configure(verbose=args.log_level == "debug", quiet=args.log_level == "warning")
    logging.getLogger().setLevel(args.log_level.upper())
    if args.log_level != "debug":
        logging.getLogger("kopf.objects").addFilter(_not_a_handler_success)
    import simpo_operator.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or _namespaces_from_env()
    # The pod's name (the chart's downward API; kopf's variable) names it among its peers; else host and pid.
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"
    readiness = Readiness(args.peering, namespaces, identity)

    if args.peering is not None:
        for namespace in namespaces or [None]:
            kube.ensure_peering(args.peering, namespace)

    @kopf.on.startup()
    def configure_peering(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.lifetime = peering.LIFETIME_S
        settings.peering.stealth = True  # no log line per keepalive (one a second)

    if args.metrics_port:
        @kopf.on.startup()
        async def start_http(memo: kopf.Memo, **_: Any) -> None:
            memo.http_runner = await metrics.serve(args.metrics_port, readiness)

        @kopf.on.cleanup()
        async def stop_http(memo: kopf.Memo, **_: Any) -> None:
            await memo.http_runner.cleanup()

    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=peering.seniority_priority() if args.peering is not None else None,
        identity=identity,
        liveness_endpoint=args.liveness or None,
        ready_flag=readiness.started,
    )
    return 0
