"""The SimpoInterleaveJob custom resource: its typed spec and status, loading and validation.

These dataclasses are the single source of the CRD schema (see crd.py) and of validation: `validate_job` checks
a resource the same way whether it comes from the API server, `simpo-interleave render` or the local runner, and
raises ConfigError naming the field path (`spec.tpu.type: ...`).

Field names are camelCase here because they are the Kubernetes API; `spec.config` is the worker config, parsed
by the worker's own parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import yaml

from simpo_operator import tpu
from simpo_worker.api import API_VERSION, KIND, Progress
from simpo_worker.config import OUTPUT_DIR_MESSAGE, OUTPUT_DIR_PATTERN, WorkerConfig
from simpo_worker.errors import ConfigError
from simpo_worker.schema import Rule, from_data, setting

# Pod hostnames are `<name>-worker-<slice>-<host>` and must fit the 63-character DNS label limit.
MAX_NAME_LENGTH = 40
DEFAULT_SERVICE_ACCOUNT = "simpo-worker"
DEFAULT_MAX_RESTARTS = 3
# A train step plus a checkpoint of the 8B reference (~24 GB per host to object storage) fits with room to spare.
DEFAULT_TERMINATION_GRACE_PERIOD_S = 300

PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
FINISHED_PHASES = ("Succeeded", "Failed")

# Rules over the whole resource (metadata included): the CRD's top-level x-kubernetes-validations.
RESOURCE_RULES = (
    Rule(f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
         lambda resource: len(resource["metadata"]["name"]) <= MAX_NAME_LENGTH,
         f"metadata.name: at most {MAX_NAME_LENGTH} characters (pod hostnames derive from it)"),
)
# Kubernetes' own patterns: a resource.Quantity, and a DNS-1123 subdomain (service account names).
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_TPU_NAME = {"min_length": 1, "max_length": 64}
_QUANTITY = {"pattern": QUANTITY_PATTERN, "pattern_message": "must be a Kubernetes quantity such as 500m, 4 or 16Gi"}


@dataclass(frozen=True)
class TpuSpec:
    """A TPU slice: either `type` (GCP accelerator-type name, e.g. v5p-32) or `accelerator` + `topology`."""

    type: Optional[str] = setting("GCP accelerator type, e.g. v5p-32, v6e-16, v5litepod-16.", None, **_TPU_NAME)
    accelerator: Optional[str] = setting("GKE accelerator, e.g. tpu-v5p-slice (with `topology`).", None,
                                         **_TPU_NAME)
    topology: Optional[str] = setting("Slice topology, e.g. 2x2x4 (with `accelerator`).", None, **_TPU_NAME)
    slices: int = setting("Multislice: this many identical slices joined over the data-center network.", 1,
                          minimum=1)

    RULES: ClassVar = (
        Rule("!(has(self.type) && (has(self.accelerator) || has(self.topology)))",
             lambda t: t.type is None or (t.accelerator is None and t.topology is None),
             "set either `type` or `accelerator` + `topology`, not both"),
        Rule("has(self.type) || (has(self.accelerator) && has(self.topology))",
             lambda t: t.type is not None or (t.accelerator is not None and t.topology is not None),
             "set `type` (e.g. v5p-32) or both `accelerator` and `topology`"),
    )

    def shape(self, path: str) -> tpu.TpuShape:
        if self.type is not None:
            return tpu.shape_for_type(self.type, f"{path}.type")
        return tpu.shape_for_topology(self.accelerator, self.topology, path)


@dataclass(frozen=True)
class ResourceList:
    cpu: Optional[str] = setting("CPU, e.g. 8 or 500m.", None, **_QUANTITY)
    memory: Optional[str] = setting("Memory, e.g. 64Gi.", None, **_QUANTITY)


@dataclass(frozen=True)
class Resources:
    """Extra container resources (TPU chips are set from the slice shape)."""

    requests: ResourceList = setting("Requests of each worker container.", default_factory=ResourceList)
    limits: ResourceList = setting("Limits of each worker container.", default_factory=ResourceList)


# kw_only: fields are listed in the order they are checked (outputDir before the config it overrides).
@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A SimPO run that pauses for inference at exact steps: the worker image, the slice, and the worker config."""

    image: str = setting("The worker image.", min_length=1, immutable=True)
    outputDir: Optional[str] = setting("Overrides config.output_dir: gs://bucket/prefix or any fsspec URL.", None,
                                       pattern=OUTPUT_DIR_PATTERN, pattern_message=OUTPUT_DIR_MESSAGE,
                                       immutable=True)
    config: WorkerConfig = setting("The worker config (mounted into every pod as a ConfigMap).")
    tpu: Optional[TpuSpec] = setting("A TPU slice (exclusive with `hosts`).", None, immutable=True)
    hosts: Optional[int] = setting("Hosts of a non-TPU pool (CPU/GPU; tests and small runs); exclusive with `tpu`.",
                                   None, minimum=1, immutable=True)
    serviceAccountName: str = setting("The worker pods' service account (it may patch this job's status).",
                                      DEFAULT_SERVICE_ACCOUNT, max_length=253, pattern=DNS_1123_SUBDOMAIN,
                                      pattern_message="must be a DNS-1123 subdomain (lower-case letters, digits, "
                                                      "'-' and '.')", immutable=True)
    resources: Resources = setting("Extra container resources.", default_factory=Resources)
    suspend: bool = setting("Suspend the JobSet (and delete its pods); false resumes from the checkpoint.", False)
    maxRestarts: int = setting("Whole-JobSet restarts (resuming from the newest checkpoint) before the job is "
                               "Failed.", DEFAULT_MAX_RESTARTS, minimum=0, immutable=True)
    terminationGracePeriodSeconds: int = setting(
        "From a worker's termination notice (SIGTERM: preemption, maintenance, eviction) to SIGKILL. The worker "
        "finishes its train step, checkpoints and exits in between: allow a step plus a checkpoint write.",
        DEFAULT_TERMINATION_GRACE_PERIOD_S, minimum=0)
    ttlSecondsAfterFinished: Optional[int] = setting(
        "Delete the resource (and everything it created) this long after it finished.", None, minimum=0)

    RULES: ClassVar = (
        Rule("!(has(self.tpu) && has(self.hosts))", lambda s: s.tpu is None or s.hosts is None,
             "set either `tpu` (a TPU slice) or `hosts` (a CPU/GPU pool), not both"),
        Rule("has(self.tpu) == has(oldSelf.tpu) && has(self.hosts) == has(oldSelf.hosts)", None,
             "spec.tpu and spec.hosts cannot be added or removed after creation"),
        Rule("has(self.outputDir) || has(self.config.output_dir)",
             lambda s: s.outputDir is not None or bool(s.config.output_dir),
             "set spec.outputDir or spec.config.output_dir"),
    )


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
    """Check a SimpoInterleaveJob (as a dict) and derive its shape. Errors name the field path.

    The schema's own rules (types, bounds, CEL rules) are the ones the API server applies at admission; what
    needs the slice's shape (the TPU type table, the mesh against the device count) is checked only here, and the
    operator reports it as InvalidSpec."""
    if resource.get("apiVersion") != API_VERSION or resource.get("kind") != KIND:
        raise ConfigError(f"apiVersion/kind: expected {API_VERSION} {KIND}, got "
                          f"{resource.get('apiVersion')} {resource.get('kind')}")
    metadata = resource.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise ConfigError("metadata.name: required")
    for rule in RESOURCE_RULES:
        if not rule.check(resource):
            raise ConfigError(f"{rule.message}, got {len(metadata['name'])}")
    spec_data = resource.get("spec")
    if not isinstance(spec_data, dict):
        raise ConfigError("spec: expected a mapping")
    if isinstance(spec_data.get("config"), dict) and spec_data.get("outputDir") is not None:
        spec_data = {**spec_data, "config": {**spec_data["config"], "output_dir": spec_data["outputDir"]}}
    # The same typed parsing as the worker's parse_worker_config, so errors read `spec.config.trainer...`.
    spec = from_data(JobSpec, spec_data, "spec")
    if spec.tpu is None:
        hosts, slices, shape = spec.hosts or 1, 1, None
    else:
        shape = spec.tpu.shape("spec.tpu")
        hosts, slices = shape.hosts, spec.tpu.slices
        # One JAX device per TPU chip (v4/v5p megacore included).
        spec.config.trainer.check_devices(shape.chips * slices, "spec.config.trainer")
        spec.config.inference.check_host_devices(shape.chips_per_host, "spec.config.inference")
    return Job(name=metadata["name"], namespace=metadata.get("namespace") or default_namespace,
               uid=metadata.get("uid"), spec=spec, hosts_per_slice=hosts, slices=slices, shape=shape)
