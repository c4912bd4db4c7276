"""Every CEL rule of the CRD against its Python twin, in seconds: cel-python evaluates each rule's expression on the
same accepting and refusing values of `self` (and `oldSelf`, for a transition rule) as its Python check, and both
must give the expected verdict. The real API server's word on the same rules: tests/cluster (after the Go build).

The values are what the API server hands CEL: defaulted from the CRD's schema and typed by it (a `number` field is
a double even when written as 1). The Python side parses them as the worker and the operator do
(schema.RuleSite.parse: every other rule checked, so a case breaks only the rule under test).
"""

from typing import Any

import celpy
import pytest
from celpy import celtypes

from dotted import changed
from operator_testkit import TINY_CONFIG
from simpo_operator import crd, resource
from simpo_worker.contract.errors import ConfigError
from simpo_worker.contract.schema import Rule, RuleSite, rule_sites

SPEC = {"image": "simpo-worker:test", "hosts": 2, "config": TINY_CONFIG}
ARCHITECTURE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "max_position_embeddings": 4096}
ON_TPU = {"image": "simpo-worker:test", "tpu": {"type": "v5p-32"}, "config": TINY_CONFIG}


def with_(data: dict, **changes: Any) -> dict:
    """A copy of `data` with dotted paths (written with `__` for `.`) set; None removes the key."""
    for path, value in changes.items():
        data = changed(data, path.replace("__", "."), value)
    return data


ARCH_CONFIG = with_(TINY_CONFIG, model={"architecture": ARCHITECTURE}, tokenizer="smollm2")
EVERY_3 = with_(TINY_CONFIG, inference={"eval_every": 3, "synthetic_prompt_count": 4, "max_new_tokens": 8})
STEPS = ([[1, 3], []], [[0, 1], [-1]], "steps must be positive")
UNIQUE = ([[1, 3], []], [[2, 2], [1, 2, 1]], "steps must be unique")
NOT_ZERO = ([1, -1, 8], [0], "must be >= 1 or -1")
PATTERNS = ([["/a.jsonl", "gs://b/*.jsonl"]], [["/a.jsonl", ""]], "file patterns must not be empty")

# (location, a fragment of the message) -> (values of `self` the rule accepts, values it refuses); for a transition
# rule, (oldSelf, self) pairs.
CASES: dict[tuple[str, str], tuple[list, list]] = {
    ("", "at most 40 characters"): ([{"metadata": {"name": "n" * 40}}], [{"metadata": {"name": "n" * 41}}]),
    ("spec", "(a CPU/GPU pool), not both"): ([SPEC, ON_TPU], [with_(SPEC, tpu={"type": "v5p-32"})]),
    ("spec", "spec.tpu and spec.hosts cannot be added or removed"): (
        [(SPEC, with_(SPEC, hosts=4)), (ON_TPU, ON_TPU)], [(SPEC, ON_TPU), (ON_TPU, SPEC)]),
    ("spec", "spec.suspend cannot be true with spec.queueName"): (
        [with_(SPEC, queueName="q"), with_(SPEC, suspend=True)], [with_(SPEC, queueName="q", suspend=True)]),
    ("spec", "it needs spec.queueName"): (
        [SPEC, with_(SPEC, queueName="q", workloadPriorityClassName="high")],
        [with_(SPEC, workloadPriorityClassName="high")]),
    ("spec", "spec.queueName cannot be added or removed"): (
        [(SPEC, SPEC), (with_(SPEC, queueName="q"), with_(SPEC, queueName="r"))],
        [(SPEC, with_(SPEC, queueName="q")), (with_(SPEC, queueName="q"), SPEC)]),
    ("spec", "set spec.outputDir or spec.config.output_dir"): (
        [SPEC, with_(SPEC, outputDir="gs://b/out", config__output_dir=None)],
        [with_(SPEC, config__output_dir=None)]),
    ("spec.config", "required when the model is random-init"): (
        [TINY_CONFIG, ARCH_CONFIG], [with_(ARCH_CONFIG, tokenizer=None)]),
    ("spec.config", "a step is beyond the run"): (
        [TINY_CONFIG, with_(TINY_CONFIG, inference__eval_at_steps=[1, 3])],
        [with_(TINY_CONFIG, inference__eval_at_steps=[1, 4])]),
    ("spec.config", "never fires within the run: must be <= trainer.num_train_steps"): (
        [EVERY_3], [with_(EVERY_3, inference__eval_every=4)]),
    ("spec.config", "held-out pairs are evaluated at the inference pauses"): (
        [with_(TINY_CONFIG, data__eval_files=["/e.jsonl"]), with_(EVERY_3, data__eval_files=["/e.jsonl"]),
         with_(TINY_CONFIG, inference=None)],
        [with_(TINY_CONFIG, data__eval_files=["/e.jsonl"], inference=None)]),
    ("spec.config", "must be <= trainer.num_train_steps"): (
        [with_(TINY_CONFIG, optimizer={"warmup_steps": 3})], [with_(TINY_CONFIG, optimizer={"warmup_steps": 4})]),
    ("spec.config", "`pauses` exports at the inference pauses"): (
        [with_(TINY_CONFIG, export={"hf_dir": "/export", "at": ["pauses"]}),
         with_(TINY_CONFIG, export={"hf_dir": "/export", "at": ["end"]}, inference=None)],
        [with_(TINY_CONFIG, export={"hf_dir": "/export", "at": ["pauses"]}, inference=None)]),
    ("spec.config", "exceeds the model's context"): (
        [ARCH_CONFIG, with_(ARCH_CONFIG, model__architecture__max_position_embeddings=32, inference=None)],
        [with_(ARCH_CONFIG, model__architecture__max_position_embeddings=519)]),
    ("spec.config", "exceeds smollm2's context"): (
        [with_(TINY_CONFIG, inference__max_new_tokens=8192 - 512)],
        [with_(TINY_CONFIG, inference__max_new_tokens=8192 - 511)]),
    ("spec.config.model", "set exactly one of `source`"): (
        [{"source": "smollm2"}, {"architecture": ARCHITECTURE}],
        [{}, {"source": "smollm2", "architecture": ARCHITECTURE}]),
    ("spec.config.model.architecture", "must divide hidden_size"): (
        [ARCHITECTURE, with_(ARCHITECTURE, hidden_size=66, head_dim=16)], [with_(ARCHITECTURE, hidden_size=66)]),
    ("spec.config.model.architecture", "rotary embeddings need an even head dim"): (
        [ARCHITECTURE, with_(ARCHITECTURE, head_dim=6)],
        [with_(ARCHITECTURE, head_dim=3), with_(ARCHITECTURE, hidden_size=60)]),
    ("spec.config.model.architecture", "must divide num_heads"): (
        [ARCHITECTURE], [with_(ARCHITECTURE, num_kv_heads=3)]),
    ("spec.config.model.architecture.rope_scaling", "must be > low_freq_factor"): (
        [{}, {"low_freq_factor": 1, "high_freq_factor": 2}],
        [{"low_freq_factor": 4.0, "high_freq_factor": 1.0}, {"low_freq_factor": 2, "high_freq_factor": 2}]),
    ("spec.config.data.train_files", PATTERNS[2]): PATTERNS[:2],
    ("spec.config.data.eval_files", PATTERNS[2]): PATTERNS[:2],
    ("spec.config.trainer", "must divide batch_size"): (
        [{"num_train_steps": 3, "batch_size": 4, "microbatches": 2}],
        [{"num_train_steps": 3, "batch_size": 4, "microbatches": 3}]),
    ("spec.config.trainer", "a step is beyond the run"): (
        [{"num_train_steps": 3, "batch_size": 4, "profile_steps": [1, 3]}],
        [{"num_train_steps": 3, "batch_size": 4, "profile_steps": [4]}]),
    ("spec.config.trainer.mesh", "at most one axis may be -1"): (
        [{}, {"data": 1, "fsdp": -1}, {"data": 2, "fsdp": 2, "model": 2}],
        [{"fsdp": -1}, {"data": 1, "fsdp": -1, "model": -1}]),
    ("spec.config.trainer.mesh.data", NOT_ZERO[2]): NOT_ZERO[:2],
    ("spec.config.trainer.mesh.fsdp", NOT_ZERO[2]): NOT_ZERO[:2],
    ("spec.config.trainer.mesh.model", NOT_ZERO[2]): NOT_ZERO[:2],
    ("spec.config.trainer.profile_steps", STEPS[2]): STEPS[:2],
    ("spec.config.trainer.profile_steps", UNIQUE[2]): UNIQUE[:2],
    ("spec.config.simpo.label_smoothing", "must be < 0.5"): ([0, 0.1, 0.49], [0.5, 0.9]),
    ("spec.config.inference", "traces the inference pauses"): (
        [{"profile": True, "eval_at_steps": [1], "synthetic_prompt_count": 4}, {"profile": False}],
        [{"profile": True}, {"profile": True, "eval_at_steps": []}]),
    ("spec.config.inference", "set exactly one of `prompts_file` or `synthetic_prompt_count`"): (
        [{"eval_at_steps": [1], "synthetic_prompt_count": 4}, {"eval_every": 2, "prompts_file": "/p.jsonl"}, {}],
        [{"eval_at_steps": [1]}, {"eval_at_steps": [1], "prompts_file": "/p.jsonl", "synthetic_prompt_count": 4}]),
    ("spec.config.inference.eval_at_steps", STEPS[2]): STEPS[:2],
    ("spec.config.inference.eval_at_steps", UNIQUE[2]): UNIQUE[:2],
    ("spec.config.inference.stop_tokens", "stop strings must not be empty"): ([["\n", "###"]], [["\n", ""]]),
    ("spec.tpu", "`accelerator` + `topology`, not both"): (
        [{"type": "v5p-32"}, {"accelerator": "tpu-v5p-slice", "topology": "2x2x4"}],
        [{"type": "v5p-32", "accelerator": "tpu-v5p-slice"}, {"type": "v5p-32", "topology": "2x2x4"}]),
    ("spec.tpu", "or both `accelerator` and `topology`"): (
        [{"type": "v5p-32"}, {"accelerator": "tpu-v5p-slice", "topology": "2x2x4"}],
        [{}, {"accelerator": "tpu-v5p-slice"}, {"topology": "2x2x4", "slices": 2}]),
    ("spec.scheduling", "set `spot` or `reservation`, not both"): (
        [{"spot": True}, {"reservation": "r"}, {"spot": False, "reservation": "r"}],
        [{"spot": True, "reservation": "r"}]),
    ("spec.scheduling.nodeSelector", "the TPU accelerator/topology labels come from spec.tpu"): (
        [{"pool": "a"}, {}], [{"cloud.google.com/gke-tpu-topology": "2x2x2"}, {"cloud.google.com/gke-spot": "true"}]),
    ("spec.pod.labels", "labels the operator, JobSet, the Job controller or Kueue set"): (
        [{"team": "a"}, {"jobset.sigs.k8s.io": "x"}],
        [{"simpo.dev/job": "x"}, {"kueue.x-k8s.io/queue-name": "x"}, {"batch.kubernetes.io/job-name": "x"}]),
    ("spec.pod.annotations", "annotations JobSet, the Job controller or Kueue set"): (
        [{"note": "a"}], [{"jobset.sigs.k8s.io/exclusive-topology": "x"}]),
    ("spec.pod.env", "the operator sets SIMPO_CONFIG"): (
        [[{"name": "HF_TOKEN", "value": "x"}], []],
        [[{"name": "HF_TOKEN", "value": "x"}, {"name": "SIMPO_CONFIG", "value": "/x"}], [{"name": "JAX_PROCESS_ID"}]]),
    ("spec.pod.env[]", "set `value` or `valueFrom`, not both"): (
        [{"name": "A", "value": "x"}, {"name": "A"}, {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}],
        [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
    ("spec.pod.envFrom[]", "set one of secretRef or configMapRef"): (
        [{"secretRef": {"name": "a"}}, {"configMapRef": {"name": "b"}, "prefix": "B_"}],
        [{}, {"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]),
}
# Immutable fields (`self == oldSelf`): a value and another one.
IMMUTABLE = {
    "spec.image": ("w:1", "w:2"), "spec.outputDir": ("gs://b/a", "gs://b/b"), "spec.tpu": ({"type": "v5p-32"},
                                                                                         {"type": "v5p-16"}),
    "spec.hosts": (2, 3), "spec.serviceAccountName": ("a", "b"), "spec.maxRestarts": (3, 4),
    "spec.queueName": ("q", "r"), "spec.priorityClassName": ("high", "low"),
    "spec.workloadPriorityClassName": ("high", "low"), "spec.scheduling": ({"spot": True}, {"spot": False}),
    "spec.pod": ({"labels": {"team": "a"}}, {"labels": {"team": "b"}}),
}


CRD_SCHEMA = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def crd_rules() -> list[tuple[str, str]]:
    """(location, expression) of every x-kubernetes-validations rule of the generated CRD."""
    found = []

    def walk(schema: dict, location: str) -> None:
        found.extend((location, rule["rule"]) for rule in schema.get("x-kubernetes-validations", []))
        for name, child in schema.get("properties", {}).items():
            walk(child, f"{location}.{name}" if location else name)
        if "items" in schema:
            walk(schema["items"], f"{location}[]")
    walk(CRD_SCHEMA, "")
    return found


def schema_at(location: str) -> dict:
    schema = CRD_SCHEMA
    for name in filter(None, location.replace("[]", ".[]").split(".")):
        schema = schema["items"] if name == "[]" else schema["properties"][name]
    return schema


def to_cel(value: Any, schema: dict) -> Any:
    """`value` as the API server hands it to CEL: defaults filled in, numbers typed by the schema."""
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        defaults = {name: child["default"] for name, child in schema["properties"].items() if "default" in child}
        value = {**defaults, **value}
        return celtypes.MapType({celtypes.StringType(name): to_cel(item, schema["properties"].get(name, {}))
                                 for name, item in value.items()})
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return celtypes.MapType({celtypes.StringType(name): to_cel(item, schema["additionalProperties"])
                                 for name, item in value.items()})
    if kind == "array":
        return celtypes.ListType([to_cel(item, schema.get("items", {})) for item in value])
    if kind == "number":
        return celtypes.DoubleType(value)
    return celpy.json_to_cel(value)


def cel_verdict(site: RuleSite, case: Any) -> bool:
    environment = celpy.Environment()
    program = environment.program(environment.compile(site.rule.cel))
    schema = schema_at(site.location)
    old, new = case if is_transition(site.rule) else (None, case)
    activation = {"self": to_cel(new, schema)}
    if old is not None:
        activation["oldSelf"] = to_cel(old, schema)
    result = program.evaluate(activation)
    assert isinstance(result, celtypes.BoolType), f"{site.rule.cel} gave {result!r} on {case!r}"
    return bool(result)


def is_transition(rule: Rule) -> bool:
    return "oldSelf" in rule.cel


def every_site() -> list[RuleSite]:
    return ([RuleSite("", dict, rule) for rule in resource.RESOURCE_RULES]
            + rule_sites(resource.JobSpec, ("spec",), "spec") + rule_sites(resource.JobStatus, ("status",), "status"))


def cases_of(site: RuleSite) -> tuple[list, list]:
    if site.rule.cel == "self == oldSelf":
        value, other = IMMUTABLE[site.location]
        return [(value, value)], [(value, other)]
    keys = case_keys(site)
    assert len(keys) == 1, f"{site.location}: {site.rule.message!r} has cases {keys}"
    return CASES[keys[0]]


def case_keys(site: RuleSite) -> list[tuple[str, str]]:
    """The CASES keys of a rule: its location and its message, or failing that, a fragment of it."""
    exact = (site.location, site.rule.message)
    if exact in CASES:
        return [exact]
    return [key for key in CASES if key[0] == site.location and key[1] in site.rule.message]


SITES = every_site()


def test_every_rule_of_the_crd_is_a_rule_site_with_cases():
    assert sorted(crd_rules()) == sorted((site.location, site.rule.cel) for site in SITES)
    assert len(SITES) == 56
    used = {key for site in SITES if site.rule.cel != "self == oldSelf" for key in case_keys(site)}
    assert used == set(CASES), f"cases of no rule: {set(CASES) - used}"
    assert {site.location for site in SITES if site.rule.cel == "self == oldSelf"} == set(IMMUTABLE)


@pytest.mark.parametrize("site", SITES, ids=lambda site: f"{site.location or '(resource)'}: {site.rule.message[:40]}")
def test_the_cel_rule_and_its_python_twin_agree(site):
    accepted, refused = cases_of(site)
    assert accepted and refused
    for expected, cases in ((True, accepted), (False, refused)):
        for case in cases:
            assert cel_verdict(site, case) is expected, f"CEL {site.rule.cel} on {case!r}"
            if site.rule.check is not None:  # else a transition rule: the API server's alone
                assert python_verdict(site, case) is expected, f"Python twin of {site.rule.cel} on {case!r}"


def python_verdict(site: RuleSite, case: Any) -> bool:
    if site.location == "":
        return bool(site.rule.check(case))  # a resource rule: over the resource as it comes
    if site.location == "spec" and "outputDir" in case:
        # As validate_job parses a spec: spec.outputDir stands in for the worker config's output_dir.
        case = with_(case, config__output_dir=case["outputDir"])
    try:
        value = site.parse(case)
    except ConfigError as error:
        # The worker config requires output_dir: without spec.outputDir either, parsing refuses it first.
        if site.rule.message == "set spec.outputDir or spec.config.output_dir" and "output_dir: required" in str(error):
            return False
        raise
    return bool(site.rule.check(value))
