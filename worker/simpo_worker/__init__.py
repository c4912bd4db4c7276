"""The worker: what each TPU host runs (distributed init, SimPO train loop, inference pauses, outputs).

Packages by role, each importing only those below it (the import-linter contracts in pyproject.toml): contract <
model, store < parallel < observe, weights < data < train, infer < plan; interleave (the train -> infer -> train
loop), preemption and main (the entry point) on top.
"""
