"""manifests/ (a kustomize base) and the Helm chart: least-privilege RBAC, the chart renders the same objects as
manifests/, every templated object carries the common labels of templates/_helpers.tpl, and values.yaml is the
documented values reference (helm-docs comments, README.md table)."""

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from operator_testkit import REPO

MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "simpo-interleave"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
# What Helm stamps on a release's objects; a kustomize base has no use for them.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")

# Every API call the operator makes (kube.py, kopf's watches, bookkeeping patches and events), and nothing more.
OPERATOR_RULES = {
    ("simpo.dev", "simpointerleavejobs"): {"get", "list", "watch", "patch", "delete"},
    ("simpo.dev", "simpointerleavejobs/status"): {"get", "patch"},
    ("jobset.x-k8s.io", "jobsets"): {"get", "list", "watch", "create", "patch"},
    ("batch", "jobs"): {"get"},
    ("", "pods"): {"list"},
    ("", "configmaps"): {"get", "create"},
    ("", "events"): {"create"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch", "create"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch", "create"},
}


def kustomize_base(directory: Path) -> list[dict]:
    """The objects of a kustomize base that only lists resources (files, or directories that are bases), read in
    Python as `kubectl kustomize` would build them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    transforms = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not transforms, f"{directory}/kustomization.yaml transforms ({transforms}): build it with kubectl kustomize"
    objects = []
    for entry in kustomization["resources"]:
        path = directory / entry
        objects += kustomize_base(path) if path.is_dir() else [o for o in yaml.safe_load_all(path.read_text()) if o]
    return objects


def manifests() -> list[dict]:
    return kustomize_base(MANIFESTS)


def find(objects, kind, name):
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def key(obj):
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def rules_of(role):
    table = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs tricks"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


def test_kustomization_lists_every_manifest_and_no_example():
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    files = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files, "every manifest is part of the base, each once"
    assert "crd.yaml" in listed
    kinds = {o["kind"] for o in manifests()}
    assert "SimpoInterleaveJob" not in kinds, "the examples are jobs to submit, not part of the install"
    assert len(set(map(key, manifests()))) == len(manifests())


def test_operator_cluster_role_lists_only_what_it_uses():
    role = find(manifests(), "ClusterRole", "simpo-interleave-operator")
    table = rules_of(role)
    assert table == OPERATOR_RULES
    flat = [item for key, verbs in table.items() for item in (*key, *verbs)]
    assert "*" not in flat and "secrets" not in flat


def test_worker_role_can_only_patch_the_status_of_its_own_kind():
    objects = manifests()
    role = find(objects, "ClusterRole", "simpo-interleave-worker")
    assert rules_of(role) == {("simpo.dev", "simpointerleavejobs/status"): {"get", "patch"}}
    binding = find(objects, "RoleBinding", "simpo-interleave-worker")
    assert binding["metadata"]["namespace"] == "simpo-jobs", "a RoleBinding: jobs' namespaces only, not cluster-wide"
    assert binding["roleRef"]["name"] == "simpo-interleave-worker"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simpo-worker", "namespace": "simpo-jobs"}]
    assert find(objects, "ServiceAccount", "simpo-worker")["metadata"]["namespace"] == "simpo-jobs"
    assert not [o for o in objects if o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == role["metadata"]
                ["name"]], "the worker role is never bound cluster-wide"


def test_operator_deployment():
    objects = manifests()
    deployment = find(objects, "Deployment", "simpo-interleave-operator")
    pod = deployment["spec"]["template"]["spec"]
    # Two replicas (kopf peering: one active, one standby), and a rolling update never goes below two ready pods.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert pod["serviceAccountName"] == "simpo-interleave-operator"
    [container] = pod["containers"]
    # The operator image's entry point (it ships the controller alone, not the simpo-interleave command line).
    assert container["command"] == ["python", "-m", "simpo_operator"]
    assert container["image"] == f"simpo-interleave/operator:{CHART_META['appVersion']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080} in container["ports"]
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    assert container["args"] == ["--metrics-port", "9090"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = {e["name"]: e for e in container["env"]}
    assert env["SIMPO_PEERING"]["value"] == "simpo-interleave-operator"
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    service = find(objects, "Service", "simpo-interleave-operator-metrics")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"} >= {
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    binding = find(objects, "ClusterRoleBinding", "simpo-interleave-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simpo-interleave-operator",
                                    "namespace": "simpo-system"}]


def control_plane_tool(name: str) -> str:
    """A pinned Go tool: $SIMPO_<NAME>, else the cluster tier's build (make control-plane)."""
    if os.environ.get(f"SIMPO_{name.upper()}"):
        return os.environ[f"SIMPO_{name.upper()}"]
    spec = importlib.util.spec_from_file_location("build_control_plane",
                                                  REPO / "tests" / "cluster" / "build_control_plane.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.bin_dir() / name
    assert path.exists(), f"{name} not built at {path}: run `make control-plane` (or set SIMPO_{name.upper()})"
    return str(path)


def run_tool(name, *args):
    result = subprocess.run([control_plane_tool(name), *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KUBECONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_helm(*args):
    return run_tool("helm", *args)


def helm_template(release, *args):
    return [o for o in yaml.safe_load_all(run_helm("template", release, str(CHART), *args)) if o]


class Yaml12Loader(yaml.SafeLoader):
    """Reads YAML 1.2 floats such as `1e-06`, as Go's YAML writes them (YAML 1.1, PyYAML's, reads a string)."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
                                   list("-+.0123456789"))


def test_kubectl_kustomize_builds_what_these_tests_read():
    built = [o for o in yaml.load_all(run_tool("kubectl", "kustomize", str(MANIFESTS)), Loader=Yaml12Loader) if o]
    assert sorted(map(key, built)) == sorted(map(key, manifests()))
    by_key = {key(o): o for o in manifests()}
    for obj in built:
        assert obj == by_key[key(obj)], key(obj)


def test_helm_lint_is_clean():
    output = run_helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in output


def without_helm_labels(obj):
    obj = copy.deepcopy(obj)
    for metadata in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata", {})):
        for label in HELM_LABELS:
            metadata.get("labels", {}).pop(label, None)
    return obj


def test_chart_renders_the_same_objects_as_manifests():
    rendered = helm_template("simpo-interleave", "--namespace", "simpo-system", "--include-crds")
    # The release namespace is helm's (--create-namespace), not a chart object.
    objects = [o for o in manifests() if key(o) != ("Namespace", None, "simpo-system")]
    assert sorted(map(key, rendered)) == sorted(map(key, objects))
    by_key = {key(o): o for o in objects}
    for obj in rendered:
        assert without_helm_labels(obj) == by_key[key(obj)], f"{key(obj)} differs between the chart and manifests/"


def test_every_templated_object_carries_the_common_labels():
    """What templates/ render (no CRD: crds/ is not templated; no NOTES: not an object) under a release whose name
    does not contain the chart's: prefixed names, the release's labels, and commonLabels."""
    release = "ml-ops"
    rendered = helm_template(release, "--namespace", "ops", "--set", "commonLabels.team=ml",
                             "--set", "jobNamespaces={team-a,team-b}")
    common = {"helm.sh/chart": f"{CHART_META['name']}-{CHART_META['version']}",
              "app.kubernetes.io/managed-by": "Helm",
              "app.kubernetes.io/name": "simpo-interleave",
              "app.kubernetes.io/instance": release,
              "app.kubernetes.io/version": CHART_META["appVersion"],
              "team": "ml"}
    assert {o["kind"] for o in rendered} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                             "RoleBinding", "Deployment", "Service"}
    for obj in rendered:
        assert set(obj) >= {"apiVersion", "kind", "metadata"}
        labels = obj["metadata"]["labels"]
        assert labels.items() >= common.items(), key(obj)
        if obj["kind"] != "Namespace":
            component = labels["app.kubernetes.io/component"]
            name = obj["metadata"]["name"]
            assert (component, name) in {("operator", "ml-ops-simpo-interleave-operator"),
                                         ("operator", "ml-ops-simpo-interleave-operator-metrics"),
                                         ("worker", "ml-ops-simpo-interleave-worker"), ("worker", "simpo-worker")}
    deployment = find(rendered, "Deployment", "ml-ops-simpo-interleave-operator")
    assert deployment["metadata"]["namespace"] == "ops"
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert template_labels.items() >= common.items()
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "simpo-interleave", "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": "operator"}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ml-ops-simpo-interleave-operator"
    binding = find(rendered, "ClusterRoleBinding", "ml-ops-simpo-interleave-operator")
    assert binding["roleRef"]["name"] == "ml-ops-simpo-interleave-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-ops-simpo-interleave-operator",
                                    "namespace": "ops"}]
    for namespace in ("team-a", "team-b"):
        assert find([o for o in rendered if o["metadata"].get("namespace") == namespace], "RoleBinding",
                    "ml-ops-simpo-interleave-worker")["roleRef"]["name"] == "ml-ops-simpo-interleave-worker"


def release_notes(tmp_path, *args):
    """NOTES.txt as the release would print it. `helm install --dry-run=client` still asks a cluster for its version,
    so a copy of the chart renders it into an object instead (a template can include another by its path)."""
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-probe.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\ndata:\n'
        '  notes: {{ include (print $.Template.BasePath "/NOTES.txt") . | quote }}\n')
    output = run_helm("template", "simpo-interleave", str(chart), "--namespace", "simpo-system",
                      "--show-only", "templates/notes-probe.yaml", *args)
    return yaml.safe_load(output)["data"]["notes"]


def test_release_notes_say_what_was_installed_and_how_to_submit_and_follow_a_job(tmp_path):
    notes = release_notes(tmp_path)
    for line in ("the operator: Deployment simpo-interleave-operator in simpo-system",
                 "in each job namespace (simpo-jobs; created by this release)",
                 "the workers' ServiceAccount simpo-worker",
                 "kubectl get deployment simpo-interleave-operator -n simpo-system",
                 "kubectl apply -n simpo-jobs -f small-cpu.yaml",
                 "kubectl get sij -n simpo-jobs "):
        assert line in notes, line
    assert "WARNING" not in notes and "spec.serviceAccountName" not in notes
    shutil.rmtree(tmp_path / CHART.name)
    notes = release_notes(tmp_path, "--set", "watchNamespaces={a,b}", "--set", "jobNamespaces={b}",
                          "--set", "worker.serviceAccountName=trainer", "--set", "createJobNamespaces=false")
    assert "WARNING: the operator serves namespace a, which is not in jobNamespaces" in notes
    assert "namespace b," not in notes and "in each job namespace (b):" in notes
    assert "set it to trainer in each job" in notes and "kubectl get sij -n b " in notes


def operator_container(objects):
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("values, check", [
    (["--set", "watchNamespaces={a,b}"],
     lambda objs: operator_container(objs)["env"][0] == {"name": "SIMPO_WATCH_NAMESPACES", "value": "a,b"}),
    (["--set-json", "watchNamespaces=[]"],
     lambda objs: operator_container(objs)["env"][0] == {"name": "SIMPO_WATCH_NAMESPACES", "value": ""}),
    (["--set", "jobNamespaces={team-a,team-b}", "--set", "worker.serviceAccountName=trainer"],
     lambda objs: sorted(o["metadata"]["namespace"] for o in objs if o["kind"] == "ServiceAccount"
                         and o["metadata"]["name"] == "trainer") == ["team-a", "team-b"]),
    (["--set", "createJobNamespaces=false"], lambda objs: not [o for o in objs if o["kind"] == "Namespace"]),
    (["--set", "image.tag=9.9.9", "--set", "logLevel=debug"],
     lambda objs: operator_container(objs)["image"] == "simpo-interleave/operator:9.9.9"
     and operator_container(objs)["env"][1] == {"name": "SIMPO_LOG_LEVEL", "value": "debug"}),
    (["--set", "fullnameOverride=sij"],
     lambda objs: {o["metadata"]["name"] for o in objs if o["kind"] in ("ClusterRole", "Deployment")}
     == {"sij-operator", "sij-worker"}),
    (["--set", "nodeSelector.pool=system", "--set", "image.pullSecrets[0].name=regcred"],
     lambda objs: [o for o in objs if o["kind"] == "Deployment"][0]["spec"]["template"]["spec"]
     .items() >= {"nodeSelector": {"pool": "system"}, "imagePullSecrets": [{"name": "regcred"}]}.items()),
    (["--set", "replicas=3", "--set", "metrics.port=9300"],
     lambda objs: [o for o in objs if o["kind"] == "Deployment"][0]["spec"]["replicas"] == 3
     and operator_container(objs)["args"] == ["--metrics-port", "9300"]
     and [o for o in objs if o["kind"] == "Service"][0]["spec"]["ports"][0]["port"] == 9300
     and not [o for o in objs if o["kind"] == "ServiceMonitor"]),
])
def test_chart_values(values, check):
    assert check(helm_template("x", "--namespace", "ops", *values))


def test_service_monitor_scrapes_the_metrics_service_when_enabled():
    objects = helm_template("x", "--namespace", "ops", "--set", "metrics.serviceMonitor.enabled=true",
                            "--set", "metrics.serviceMonitor.labels.release=prom")
    [monitor] = [o for o in objects if o["kind"] == "ServiceMonitor"]
    [service] = [o for o in objects if o["kind"] == "Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["namespace"] == "ops"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    assert monitor["spec"]["endpoints"] == [{"port": service["spec"]["ports"][0]["name"], "path": "/metrics",
                                             "interval": "30s"}]


KEY_LINE = re.compile(r"^( *)([A-Za-z0-9_.-]+):(?: |$)")


def values_reference(text: str) -> tuple[list[str], set[tuple[str, ...]]]:
    """The values table helm-docs writes from values.yaml's `# --` comments (sorted keys, Go's JSON of the default
    unless `# @default --` says otherwise), and the paths that have a `# --` comment."""
    values = yaml.safe_load(text)
    rows, documented, comment, stack = {}, set(), [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match:
            indent = len(match[1])
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match[2])]
            path = tuple(k for _, k in stack)
            starts = [i for i, c in enumerate(comment) if c.startswith("-- ")]
            if starts:
                lines = comment[starts[-1]:]
                description = " ".join([lines[0][3:], *(c for c in lines[1:] if not c.startswith("@default -- "))])
                defaults = [c.removeprefix("@default -- ") for c in lines[1:] if c.startswith("@default -- ")]
                value = values
                for part in path:
                    value = value[part]
                kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[
                    type(value)]
                default = defaults[0] if defaults else f"`{json.dumps(value, sort_keys=True, separators=(',', ':'))}`"
                rows[".".join(path)] = f"| {'.'.join(path)} | {kind} | {default} | {description} |"
                documented.add(path)
        comment = []
    return [rows[k] for k in sorted(rows)], documented


def leaves(values, path=()):
    if isinstance(values, dict) and values:
        for name, value in values.items():
            yield from leaves(value, (*path, name))
    else:
        yield path


def test_every_value_is_documented_and_in_the_readme():
    table, documented = values_reference((CHART / "values.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = [".".join(p) for p in leaves(values) if not any(p[:n] in documented for n in range(1, len(p) + 1))]
    assert not undocumented, f"values without a `# --` description (helm-docs): {undocumented}"
    readme = (CHART / "README.md").read_text().split("## Values\n", 1)[1]
    rows = [line for line in readme.splitlines() if line.startswith("| ") and not line.startswith("| Key ")]
    assert rows == table, "charts/simpo-interleave/README.md's values table is stale: regenerate it (helm-docs)"
