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

from simpo_operator import pod_env, tpu
from simpo_worker.contract.api import API_VERSION, KIND, Progress
from simpo_worker.contract.config import OUTPUT_DIR_MESSAGE, OUTPUT_DIR_PATTERN, WorkerConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.contract.schema import Rule, from_data, setting

# Pod hostnames are `<name>-worker-<slice>-<host>` and must fit the 63-character DNS label limit.
MAX_NAME_LENGTH = 40
DEFAULT_SERVICE_ACCOUNT = "simpo-worker"
DEFAULT_MAX_RESTARTS = 3
# A train step plus a checkpoint of the 8B reference (~24 GB per host to object storage) fits with room to spare.
DEFAULT_TERMINATION_GRACE_PERIOD_S = 300

PHASES = ("Queued", "Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
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
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_TPU_NAME = {"min_length": 1, "max_length": 64}
_QUANTITY = {"pattern": QUANTITY_PATTERN, "pattern_message": "must be a Kubernetes quantity such as 500m, 4 or 16Gi"}
_SUBDOMAIN = {"max_length": 253, "pattern": DNS_1123_SUBDOMAIN,
              "pattern_message": "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')"}

# Labels the operator puts on everything it creates (the job label selects a job's JobSet and pods).
JOB_LABEL = "simpo.dev/job"
APP_LABELS = {"app.kubernetes.io/name": "simpo-interleave", "app.kubernetes.io/component": "worker",
              "app.kubernetes.io/managed-by": "simpo-interleave-operator"}
# Kueue: the LocalQueue a workload is submitted to (on the JobSet; Kueue then owns JobSet.spec.suspend).
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue: the WorkloadPriorityClass of the workload (queueing order and preemption only, not the pods' priority).
WORKLOAD_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# GKE node labels of spot VMs (also their taint's key) and of a specific reservation's nodes.
SPOT_LABEL = "cloud.google.com/gke-spot"
RESERVATION_LABEL = "cloud.google.com/reservation-name"
RESERVATION_AFFINITY_LABEL = "cloud.google.com/reservation-affinity"
# Pod metadata written by the operator, JobSet, the Job controller or Kueue: a user's would be overwritten or
# would break what they select.
OWNED_LABELS = (JOB_LABEL, *APP_LABELS, "job-name", "controller-uid")
OWNED_PREFIXES = ("jobset.sigs.k8s.io/", "batch.kubernetes.io/", "kueue.x-k8s.io/")
RESERVED_NODE_LABELS = (tpu.ACCELERATOR_LABEL, tpu.TOPOLOGY_LABEL, SPOT_LABEL, RESERVATION_LABEL,
                        RESERVATION_AFFINITY_LABEL)
CONFIG_VOLUME = "config"


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def _free_keys(keys: tuple[str, ...], prefixes: tuple[str, ...], message: str) -> Rule:
    """A rule over a string map: none of `keys`, no key starting with one of `prefixes`."""
    cel = f"self.all(k, !(k in {_cel_list(keys)})" + "".join(f" && !k.startsWith('{p}')" for p in prefixes) + ")"
    return Rule(cel, lambda mapping: not any(k in keys or k.startswith(prefixes) for k in mapping), message)


# A Kubernetes API object kept as given (affinity, volumes, valueFrom): the API server validates it on the
# rendered JobSet, and a refusal shows in the job's status as ChildCreateFailed.
KubeObject = dict[str, Any]


@dataclass(frozen=True)
class Toleration:
    """A toleration (core/v1 Toleration)."""

    key: Optional[str] = setting("The taint key; empty with operator Exists tolerates every taint.", None)
    operator: Literal["Exists", "Equal"] = setting("Exists or Equal.", "Equal")
    value: Optional[str] = setting("The taint value (operator Equal).", None)
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = setting(
        "The taint effect to tolerate; empty tolerates all.", None)
    tolerationSeconds: Optional[int] = setting("NoExecute only: how long the pod stays bound after the taint.",
                                               None)


@dataclass(frozen=True)
class Scheduling:
    """Where the worker pods run: added to the TPU slice's node selector and toleration, never replacing them."""

    nodeSelector: Optional[dict[str, str]] = setting(
        "Extra node labels every worker pod requires.", None,
        rules=(_free_keys(RESERVED_NODE_LABELS, (), "the TPU accelerator/topology labels come from spec.tpu, the "
                          "spot and reservation labels from spec.scheduling.spot / reservation"),))
    tolerations: list[Toleration] = setting("Extra tolerations.", default_factory=list)
    affinity: Optional[KubeObject] = setting("A core/v1 Affinity (node, pod, pod anti-affinity).", None)
    spot: bool = setting("Run on GKE spot VMs: the cloud.google.com/gke-spot node selector and toleration.",
                         False)
    reservation: Optional[str] = setting(
        "Consume this specific GKE reservation (cloud.google.com/reservation-name, reservation-affinity "
        "specific).", None, min_length=1, max_length=253)

    RULES: ClassVar = (
        # No node is both: Compute Engine spot VMs never consume reservations, so the pods would stay Pending.
        Rule("!(has(self.spot) && self.spot && has(self.reservation))",
             lambda s: not (s.spot and s.reservation is not None),
             "set `spot` or `reservation`, not both: spot VMs do not consume reservations"),
    )


@dataclass(frozen=True)
class ObjectReference:
    name: str = setting("The object's name.", min_length=1, **_SUBDOMAIN)


@dataclass(frozen=True)
class EnvVar:
    """A container environment variable (core/v1 EnvVar)."""

    name: str = setting("The variable's name.", min_length=1, max_length=253,
                        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
                        pattern_message="must be letters, digits, '_', '-' or '.', not starting with a digit")
    value: Optional[str] = setting("Its value.", None)
    valueFrom: Optional[KubeObject] = setting("A core/v1 EnvVarSource (secretKeyRef, fieldRef ...).", None)

    RULES: ClassVar = (
        Rule("!(has(self.value) && has(self.valueFrom))", lambda e: e.value is None or e.valueFrom is None,
             "set `value` or `valueFrom`, not both"),
    )


@dataclass(frozen=True)
class EnvFromSource:
    """All keys of a Secret (e.g. an HF token) or ConfigMap as environment variables (core/v1 EnvFromSource)."""

    secretRef: Optional[ObjectReference] = setting("A Secret in the job's namespace.", None)
    configMapRef: Optional[ObjectReference] = setting("A ConfigMap in the job's namespace.", None)
    prefix: Optional[str] = setting("Prepended to every key.", None)

    RULES: ClassVar = (
        Rule("has(self.secretRef) != has(self.configMapRef)",
             lambda e: (e.secretRef is None) != (e.configMapRef is None), "set one of secretRef or configMapRef"),
    )


@dataclass(frozen=True)
class VolumeMount:
    """Where the worker container mounts one of spec.pod.volumes (core/v1 VolumeMount)."""

    name: str = setting("The volume's name.", min_length=1, max_length=63)
    mountPath: str = setting("The path in the container.", min_length=1)
    readOnly: bool = setting("Mount read-only.", False)
    subPath: Optional[str] = setting("A path within the volume to mount instead of its root.", None)


_OPERATOR_ENV = pod_env.OPERATOR_ENV_NAMES


@dataclass(frozen=True)
class PodSettings:
    """Extra settings of every worker pod and its container."""

    labels: Optional[dict[str, str]] = setting(
        "Extra pod labels.", None,
        rules=(_free_keys(OWNED_LABELS, OWNED_PREFIXES, "labels the operator, JobSet, the Job controller or "
                          "Kueue set are not allowed (spec.queueName sets Kueue's)"),))
    annotations: Optional[dict[str, str]] = setting(
        "Extra pod annotations, e.g. gke-gcsfuse/volumes: \"true\" for the GCS FUSE CSI driver.", None,
        rules=(_free_keys((), OWNED_PREFIXES, "annotations JobSet, the Job controller or Kueue set are not "
                          "allowed"),))
    env: list[EnvVar] = setting(
        "Extra environment of the worker container, e.g. LIBTPU_INIT_ARGS or XLA_FLAGS. Names the operator sets "
        "are refused.", default_factory=list,
        rules=(Rule(f"self.all(e, !(e.name in {_cel_list(_OPERATOR_ENV)}))",
                    lambda env: not any(e.name in _OPERATOR_ENV for e in env),
                    f"the operator sets {', '.join(_OPERATOR_ENV)}"),))
    envFrom: list[EnvFromSource] = setting("Environment from Secrets or ConfigMaps.", default_factory=list)
    volumes: list[KubeObject] = setting(
        "Extra core/v1 Volumes (e.g. a GCS FUSE CSI volume, or /dev/shm as an emptyDir of medium Memory).",
        default_factory=list)
    volumeMounts: list[VolumeMount] = setting(
        "Mounts of spec.pod.volumes in the worker container.", default_factory=list)
    imagePullSecrets: list[ObjectReference] = setting("Secrets to pull the worker image with.",
                                                      default_factory=list)
    hostNetwork: bool = setting(
        "Use the node's network (multislice over the data-center network); sets dnsPolicy ClusterFirstWithHostNet "
        "so the pods still resolve each other.", False)


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
    queueName: Optional[str] = setting(
        "Submit through Kueue: the LocalQueue (in the job's namespace) the JobSet is queued in. Kueue then admits "
        "and suspends the JobSet; spec.suspend must stay false.", None, max_length=63, pattern=DNS_1123_LABEL,
        pattern_message="must be a DNS-1123 label (a LocalQueue name)", immutable=True)
    priorityClassName: Optional[str] = setting(
        "The worker pods' PriorityClass (Kueue also takes the workload's priority from it).", None,
        immutable=True, **_SUBDOMAIN)
    workloadPriorityClassName: Optional[str] = setting(
        "A Kueue WorkloadPriorityClass: the workload's priority in Kueue (queueing order, preemption) without "
        "changing the pods' priority. Needs spec.queueName.", None, immutable=True, **_SUBDOMAIN)
    scheduling: Scheduling = setting("Node selection, tolerations, affinity, spot and reservations.",
                                     default_factory=Scheduling, immutable=True)
    pod: PodSettings = setting("Labels, annotations, env, volumes and networking of every worker pod.",
                               default_factory=PodSettings, immutable=True)

    RULES: ClassVar = (
        Rule("!(has(self.tpu) && has(self.hosts))", lambda s: s.tpu is None or s.hosts is None,
             "set either `tpu` (a TPU slice) or `hosts` (a CPU/GPU pool), not both"),
        Rule("has(self.tpu) == has(oldSelf.tpu) && has(self.hosts) == has(oldSelf.hosts)", None,
             "spec.tpu and spec.hosts cannot be added or removed after creation"),
        Rule("!(has(self.queueName) && self.suspend)", lambda s: s.queueName is None or not s.suspend,
             "spec.suspend cannot be true with spec.queueName: Kueue owns the JobSet's suspend (deactivate the "
             "job's Workload or delete the job instead)"),
        Rule("!has(self.workloadPriorityClassName) || has(self.queueName)",
             lambda s: s.workloadPriorityClassName is None or s.queueName is not None,
             "spec.workloadPriorityClassName is Kueue's: it needs spec.queueName"),
        Rule("has(self.queueName) == has(oldSelf.queueName)", None,
             "spec.queueName cannot be added or removed after creation"),
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


def _check_volumes(pod: PodSettings) -> None:
    """What the schema cannot say about free-form volumes: each named, uniquely, and every mount names one."""
    names = []
    for i, volume in enumerate(pod.volumes):
        name = volume.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"spec.pod.volumes[{i}].name: required")
        if name == CONFIG_VOLUME or name in names:
            raise ConfigError(f"spec.pod.volumes[{i}].name: {name!r} is taken"
                              + (" (the operator's config volume)" if name == CONFIG_VOLUME else ""))
        names.append(name)
    for i, mount in enumerate(pod.volumeMounts):
        if mount.name not in names:
            raise ConfigError(f"spec.pod.volumeMounts[{i}].name: {mount.name!r} is not one of spec.pod.volumes "
                              f"({', '.join(names) or 'none'})")


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
    _check_volumes(spec.pod)
    if spec.tpu is None:
        hosts, slices, shape = spec.hosts or 1, 1, None
    else:
        shape = spec.tpu.shape("spec.tpu")
        hosts, slices = shape.hosts, spec.tpu.slices
        # One JAX device per TPU chip (v4/v5p megacore included).
        spec.config.trainer.check_devices(shape.chips * slices, "spec.config.trainer", slices)
        spec.config.inference.check_host_devices(shape.chips_per_host, "spec.config.inference")
    return Job(name=metadata["name"], namespace=metadata.get("namespace") or default_namespace,
               uid=metadata.get("uid"), spec=spec, hosts_per_slice=hosts, slices=slices, shape=shape)
