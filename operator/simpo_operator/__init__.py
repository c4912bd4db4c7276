"""The control side: SimpoInterleaveJob CRD, JobSet rendering, the kopf operator and the local runner."""
