"""The kopf handlers of the operator, one concern a module; importing this package registers them with kopf
(`kopf run -m simpo_operator.handlers`, or simpo_operator.main).

- reconcile: SimpoInterleaveJob -> ConfigMap + JobSet (create, resume, spec update);
- jobset_events: the JobSet's state -> the job's status.phase, with a Kubernetes event on every transition;
- expiry: ttlSecondsAfterFinished, a timer per finished job;
- settings (kopf's settings at startup), diff_base (kopf's diff base: the spec's generation), creation_burst (the
  other API calls of a burst of creations wait for its JobSets), phase (the status patch of a phase).
The phase fields are written from one place per situation, so two handlers never race on them: `reconcile` only
for a spec it rejects (nothing is created then), `jobset_changed` from the JobSet's state otherwise.
No finalizers: deletion cascades through owner references.
"""

from simpo_operator.handlers import expiry, jobset_events, reconcile, settings  # noqa: F401 (registers them)
