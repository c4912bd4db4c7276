"""The worker: what each TPU host runs (distributed init, SimPO train loop, inference pauses, outputs)."""
