"""kopf's settings, at the operator's startup: what kopf keeps where, how many handler threads, no scanning."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from simpo_operator import kube
from simpo_operator.handlers.diff_base import ObservedGenerationDiffBase
from simpo_worker.contract.api import GROUP


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping out of the status: it belongs to the API (and status.progress to the worker). A
    # handler's progress (only kept while it retries) goes in annotations under a `kopf.` prefix: any other prefix
    # kopf marks with an annotation the first time it stores progress, a patch of every new job.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{GROUP}")
    settings.persistence.diffbase_storage = ObservedGenerationDiffBase()
    # Watch exact namespaces or the whole cluster: no CRD/namespace scanning, so no RBAC for it.
    settings.scanning.disabled = True
    # Our own events are posted explicitly; handler log lines below WARNING stay in the log only.
    settings.posting.level = logging.WARNING
    # reconcile's API calls block a thread each (kubernetes client): a thread per job of a 100-job burst, so none
    # waits for another's API calls to start its own (kube.CONNECTIONS; bench/README.md, operator_load.py).
    settings.execution.max_workers = kube.CONNECTIONS
    # The API client now, not in the first handlers: they would each build one at once, racing for the GIL with
    # the burst of events being dispatched (7 s for the first jobs of a 100-job burst).
    kube.warm_up()

