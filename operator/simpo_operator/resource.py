"""The SimpoInterleaveJob custom resource: its typed spec and status, loading and validation.

These dataclasses are the single source of the CRD schema (see crd.py) and of validation: `validate_job` checks
a resource the same way whether it comes from the API server, `simpo-interleave render` or the local runner, and
raises ConfigError naming the field path (`spec.tpu.type: ...`).

Field names are camelCase here because they are the Kubernetes API; `spec.config` is the worker config, parsed
by the worker's own parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from simpo_operator import tpu
from simpo_worker.api import API_VERSION, KIND, Progress
from simpo_worker.config import WorkerConfig, from_data
from simpo_worker.errors import ConfigError

# Pod hostnames are `<name>-worker-<slice>-<host>` and must fit the 63-character DNS label limit.
MAX_NAME_LENGTH = 40
DEFAULT_SERVICE_ACCOUNT = "simpo-worker"
DEFAULT_MAX_RESTARTS = 3

PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class TpuSpec:
    """A TPU slice: either `type` (GCP accelerator-type name, e.g. v5p-32) or `accelerator` + `topology`."""

    type: Optional[str] = None
    accelerator: Optional[str] = None
    topology: Optional[str] = None
    # Multislice: this many identical slices joined over the data-center network.
    slices: int = 1

    def shape(self, path: str) -> tpu.TpuShape:
        if self.type is not None and (self.accelerator is not None or self.topology is not None):
            raise ConfigError(f"{path}: set either `type` or `accelerator` + `topology`, not both")
        if self.type is not None:
            return tpu.shape_for_type(self.type, f"{path}.type")
        if self.accelerator is None or self.topology is None:
            raise ConfigError(f"{path}: set `type` (e.g. v5p-32) or both `accelerator` and `topology`")
        return tpu.shape_for_topology(self.accelerator, self.topology, path)


@dataclass(frozen=True)
class ResourceList:
    cpu: Optional[str] = None
    memory: Optional[str] = None


@dataclass(frozen=True)
class Resources:
    """Extra container resources (TPU chips are set from the slice shape)."""

    requests: ResourceList = field(default_factory=ResourceList)
    limits: ResourceList = field(default_factory=ResourceList)


@dataclass(frozen=True)
class JobSpec:
    image: str
    config: WorkerConfig
    tpu: Optional[TpuSpec] = None
    # Hosts of a non-TPU pool (CPU/GPU; tests and small runs). Exclusive with `tpu`.
    hosts: Optional[int] = None
    # Overrides config.output_dir: gs://bucket/prefix or any fsspec URL.
    outputDir: Optional[str] = None
    serviceAccountName: str = DEFAULT_SERVICE_ACCOUNT
    resources: Resources = field(default_factory=Resources)
    suspend: bool = False
    # Whole-JobSet restarts (resuming from the newest checkpoint) before the job is Failed.
    maxRestarts: int = DEFAULT_MAX_RESTARTS
    # Delete the resource (and, through owner references, everything it created) this long after it finished.
    ttlSecondsAfterFinished: Optional[int] = None


@dataclass(frozen=True)
class Condition:
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: Optional[int] = None


@dataclass(frozen=True)
class JobStatus:
    phase: Optional[Literal[PHASES]] = None
    reason: Optional[str] = None
    message: Optional[str] = None
    conditions: list[Condition] = field(default_factory=list)
    jobSetName: Optional[str] = None
    restarts: Optional[int] = None
    observedGeneration: Optional[int] = None
    startTime: Optional[str] = None
    completionTime: Optional[str] = None
    outputDir: Optional[str] = None
    hosts: Optional[int] = None
    progress: Optional[Progress] = None


@dataclass(frozen=True)
class Job:
    """A validated SimpoInterleaveJob: what rendering needs."""

    name: str
    namespace: str
    uid: Optional[str]
    spec: JobSpec
    hosts_per_slice: int
    slices: int
    shape: Optional[tpu.TpuShape]  # None on non-TPU pools

    @property
    def num_processes(self) -> int:
        return self.hosts_per_slice * self.slices


def load_job(file: str) -> dict[str, Any]:
    """Read one SimpoInterleaveJob YAML file (not yet validated)."""
    try:
        with open(file, encoding="utf-8") as handle:
            resource = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"{file}: cannot read job: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    if not isinstance(resource, dict):
        raise ConfigError(f"{file}: expected one {KIND} mapping")
    return resource


def validate_job(resource: dict[str, Any], default_namespace: str = "default") -> Job:
    """Check a SimpoInterleaveJob (as a dict) and derive its shape. Errors name the field path."""
    if resource.get("apiVersion") != API_VERSION or resource.get("kind") != KIND:
        raise ConfigError(f"apiVersion/kind: expected {API_VERSION} {KIND}, got "
                          f"{resource.get('apiVersion')} {resource.get('kind')}")
    metadata = resource.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise ConfigError("metadata.name: required")
    name = metadata["name"]
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"metadata.name: at most {MAX_NAME_LENGTH} characters (pod hostnames derive from it), "
                          f"got {len(name)}")
    spec_data = resource.get("spec")
    if not isinstance(spec_data, dict):
        raise ConfigError("spec: expected a mapping")
    if isinstance(spec_data.get("config"), dict) and spec_data.get("outputDir") is not None:
        spec_data = {**spec_data, "config": {**spec_data["config"], "output_dir": spec_data["outputDir"]}}
    # The same typed parsing as the worker's parse_worker_config, so errors read `spec.config.trainer...`.
    spec = from_data(JobSpec, spec_data, "spec")
    spec.config.validate("spec.config")
    hosts, slices, shape = _topology(spec)
    if spec.maxRestarts < 0:
        raise ConfigError(f"spec.maxRestarts: must be >= 0, got {spec.maxRestarts}")
    if spec.ttlSecondsAfterFinished is not None and spec.ttlSecondsAfterFinished < 0:
        raise ConfigError(f"spec.ttlSecondsAfterFinished: must be >= 0, got {spec.ttlSecondsAfterFinished}")
    if not spec.image.strip():
        raise ConfigError("spec.image: must not be empty")
    return Job(name=name, namespace=metadata.get("namespace") or default_namespace, uid=metadata.get("uid"),
               spec=spec, hosts_per_slice=hosts, slices=slices, shape=shape)


def _topology(spec: JobSpec) -> tuple[int, int, Optional[tpu.TpuShape]]:
    if spec.tpu is not None and spec.hosts is not None:
        raise ConfigError("spec: set either `tpu` (a TPU slice) or `hosts` (a CPU/GPU pool), not both")
    if spec.tpu is None:
        hosts = 1 if spec.hosts is None else spec.hosts
        if hosts < 1:
            raise ConfigError(f"spec.hosts: must be >= 1, got {hosts}")
        return hosts, 1, None
    if spec.tpu.slices < 1:
        raise ConfigError(f"spec.tpu.slices: must be >= 1, got {spec.tpu.slices}")
    shape = spec.tpu.shape("spec.tpu")
    return shape.hosts, spec.tpu.slices, shape
