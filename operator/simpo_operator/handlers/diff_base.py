"""kopf's diff base as the spec's generation alone (see ObservedGenerationDiffBase)."""

from __future__ import annotations

from typing import Any, Optional

import kopf


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base (the last handled state, which tells a creation, an update of the spec and nothing new
    apart) as the spec's generation alone: the API server bumps it on every change of spec and on nothing else, and
    the last handled one is status.observedGeneration, which `reconcile` writes anyway. So only `field="spec"`
    handlers can be told apart, and kopf's diff says nothing but the generation (reconcile reads neither).

    kopf's default essence is a deep copy of each event's body (job and JobSet events alike: the operator's largest
    CPU cost under a burst of creations), and its stored copy of the handled one, an annotation, cost a patch of
    the job on every creation besides the status patch: a write the API server validates against the CRD's rules
    and a watch event back (bench/README.md, operator_load.py)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence(spec={"generation": body.metadata.get("generation")})

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        observed = body.status.get("observedGeneration")
        return None if observed is None else kopf.BodyEssence(spec={"generation": observed})

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass  # reconcile's status.observedGeneration is the record

