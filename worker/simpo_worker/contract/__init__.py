"""The contract between the operator and the worker: the resource's API identity, status.progress, the pod
environment, exit codes and errors, and the worker config with its schema. Dependency-free (standard library and
PyYAML): imports nothing else of simpo_worker; the operator imports only this package."""
