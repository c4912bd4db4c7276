"""`simpo-interleave operator`: run the kopf operator (the handlers in simpo_operator.handlers).

Auth is kopf's login: the pod's service account in a cluster, else the current kubeconfig context. One replica
runs standalone (no peering objects, so no RBAC for them); `--peering NAME` enables kopf peering for several.
"""

from __future__ import annotations

import argparse
import logging
import os

import kopf

LOG_LEVELS = ("debug", "info", "warning")


def _namespaces_from_env() -> list[str]:
    # The chart passes the watched namespaces as one comma-separated variable.
    return [name.strip() for name in os.environ.get("SIMPO_WATCH_NAMESPACES", "").split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=None,
                        help="watch this namespace (repeatable; default: $SIMPO_WATCH_NAMESPACES, else all)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL (empty: none)")
    parser.add_argument("--peering", metavar="NAME", default=None,
                        help="enable kopf peering under this name (several replicas); default: standalone")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=os.environ.get("SIMPO_LOG_LEVEL", "info"))


def run(args: argparse.Namespace) -> int:
    kopf.configure(verbose=args.log_level == "debug", quiet=args.log_level == "warning")
    logging.getLogger().setLevel(args.log_level.upper())
    import simpo_operator.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or _namespaces_from_env()
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness or None,
    )
    return 0
