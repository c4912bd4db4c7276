"""The generated CRD: committed copies are current, the schema is structural, and examples conform to it."""

import copy

import pytest
import yaml

from operator_testkit import EXAMPLES, REPO, make_job
from simpo_operator import crd
from simpo_operator.resource import PHASES


def schema():
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", crd.crd_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_committed_crd_is_current(path):
    assert path.read_text() == crd.crd_yaml(), f"{path} is stale: run `simpo-interleave crd --write`"


def test_names_subresource_and_columns():
    spec = crd.build_crd()["spec"]
    assert crd.build_crd()["metadata"]["name"] == "simpointerleavejobs.simpo.dev"
    assert spec["names"]["shortNames"] == ["sij"] and "simpo" in spec["names"]["categories"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Restarts"] == ".status.restarts"
    assert columns["Stage"] == ".status.progress.stage" and columns["Step"] == ".status.progress.step"
    assert columns["Eval-Acc"] == ".status.progress.evalAccuracy"
    assert columns["Age"] == ".metadata.creationTimestamp"


def walk(node, path="$"):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert "type" in node, f"{path} has no type"
        if node["type"] == "object" and path != "$.metadata":
            assert (node.get("properties") or node.get("additionalProperties")
                    or node.get("x-kubernetes-preserve-unknown-fields")), \
                f"{path}: an object without properties would need preserve-unknown"
            assert not (node.get("properties") and node.get("additionalProperties")), \
                f"{path}: properties and additionalProperties are exclusive in a structural schema"
        assert set(node.get("required", [])) <= set(node.get("properties", {})), path


def test_status_schema_covers_phases_and_progress():
    status = schema()["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == list(PHASES)
    assert set(status["progress"]["properties"]) == {"stage", "step", "totalSteps", "promptsDone", "promptsTotal",
                                                     "tokens", "evalStep", "evalLoss", "evalAccuracy", "updateTime"}
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_cel_rules():
    spec = schema()["properties"]["spec"]
    tpu_rules = {rule["rule"]: rule["message"] for rule in spec["properties"]["tpu"]["x-kubernetes-validations"]}
    assert tpu_rules["!(has(self.type) && (has(self.accelerator) || has(self.topology)))"].startswith("set either")
    assert tpu_rules["has(self.type) || (has(self.accelerator) && has(self.topology))"].startswith("set `type`")
    assert tpu_rules["self == oldSelf"] == "spec.tpu is immutable"
    for field in ("image", "hosts", "outputDir", "serviceAccountName", "maxRestarts", "queueName", "priorityClassName",
                  "scheduling", "pod"):
        rules = spec["properties"][field]["x-kubernetes-validations"]
        assert {"rule": "self == oldSelf", "message": f"spec.{field} is immutable"} in rules
    for editable in ("suspend", "ttlSecondsAfterFinished"):
        assert "x-kubernetes-validations" not in spec["properties"][editable]
    assert any("tpu" in rule["rule"] and "hosts" in rule["rule"] for rule in spec["x-kubernetes-validations"])


def conform(value, node, path="$"):
    """What the API server's structural schema checks (types, required, enums, unknown fields), for tests."""
    if value is None:
        assert node.get("nullable"), f"{path}: null"
        return
    kind = node["type"]
    expected = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    assert isinstance(value, expected[kind]) and not (kind in ("integer", "number") and isinstance(value, bool)), \
        f"{path}: expected {kind}, got {value!r}"
    if "enum" in node:
        assert value in node["enum"], f"{path}: {value!r} not in {node['enum']}"
    if kind == "object" and "properties" in node:
        unknown = set(value) - set(node["properties"])
        assert not unknown, f"{path}: unknown fields {unknown}"
        for name in node.get("required", []):
            assert name in value, f"{path}.{name}: required"
        for name, child in value.items():
            conform(child, node["properties"][name], f"{path}.{name}")
    if kind == "object" and "additionalProperties" in node:
        for name, child in value.items():
            conform(child, node["additionalProperties"], f"{path}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            conform(item, node["items"], f"{path}[{i}]")


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_conform_to_the_schema(example):
    conform(yaml.safe_load(example.read_text()), schema())


def test_schema_rejects_what_the_api_server_must():
    good = make_job()
    conform(good, schema())
    for path, value, message in [
        (("spec", "config", "trainer", "steps"), 3, "unknown fields"),
        (("spec", "config", "inference", "mode"), "everywhere", "not in"),
        (("spec", "hosts"), "2", "expected integer"),
        (("spec", "tpu"), {"type": "v5p-32", "cores": 4}, "unknown fields"),
    ]:
        bad = copy.deepcopy(good)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(AssertionError, match=message):
            conform(bad, schema())


def test_crd_command_prints_the_yaml(capsys):
    from simpo_interleave.cli import main

    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == crd.build_crd()


def test_status_progress_is_the_contracts_progress_type():
    """The CRD's status.progress is generated from the one Progress type the worker sends (simpo_worker.contract.api): a
    field the schema lacked would be pruned by the apiserver without an error."""
    from simpo_worker.contract import api
    from simpo_worker.contract.schema import openapi_schema

    assert crd.status_schema()["properties"]["progress"] == openapi_schema(api.Progress, ("status", "progress"))
    assert crd.status_schema()["properties"]["progress"]["properties"]["stage"]["enum"] == [
        "train", "infer", "eval", "done"]
