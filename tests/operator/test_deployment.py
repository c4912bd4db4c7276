"""manifests/ and the Helm chart: least-privilege RBAC, and the chart renders the same objects as manifests/."""

import importlib.util
import os
import subprocess

import pytest
import yaml

from operator_testkit import REPO

MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "simpo-interleave"

# Every API call the operator makes (kube.py, kopf's watches, bookkeeping patches and events), and nothing more.
OPERATOR_RULES = {
    ("simpo.dev", "simpointerleavejobs"): {"get", "list", "watch", "patch", "delete"},
    ("simpo.dev", "simpointerleavejobs/status"): {"get", "patch"},
    ("jobset.x-k8s.io", "jobsets"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "create"},
    ("", "events"): {"create"},
}


def load(*names):
    return [obj for name in names for obj in yaml.safe_load_all((MANIFESTS / name).read_text()) if obj]


def find(objects, kind, name):
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def rules_of(role):
    table = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs tricks"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


def test_operator_cluster_role_lists_only_what_it_uses():
    role = find(load("operator.yaml"), "ClusterRole", "simpo-interleave-operator")
    table = rules_of(role)
    assert table == OPERATOR_RULES
    flat = [item for key, verbs in table.items() for item in (*key, *verbs)]
    assert "*" not in flat and "secrets" not in flat


def test_worker_role_can_only_patch_the_status_of_its_own_kind():
    objects = load("worker-rbac.yaml")
    role = find(objects, "ClusterRole", "simpo-interleave-worker")
    assert rules_of(role) == {("simpo.dev", "simpointerleavejobs/status"): {"get", "patch"}}
    binding = find(objects, "RoleBinding", "simpo-interleave-worker")
    assert binding["metadata"]["namespace"] == "simpo-jobs", "a RoleBinding: jobs' namespaces only, not cluster-wide"
    assert binding["roleRef"]["name"] == "simpo-interleave-worker"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simpo-worker", "namespace": "simpo-jobs"}]
    assert find(objects, "ServiceAccount", "simpo-worker")["metadata"]["namespace"] == "simpo-jobs"


def test_operator_deployment():
    objects = load("operator.yaml")
    deployment = find(objects, "Deployment", "simpo-interleave-operator")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["serviceAccountName"] == "simpo-interleave-operator"
    [container] = pod["containers"]
    assert container["command"] == ["simpo-interleave", "operator"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080} in container["ports"]
    binding = find(objects, "ClusterRoleBinding", "simpo-interleave-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simpo-interleave-operator",
                                    "namespace": "simpo-system"}]


def helm() -> str:
    """The pinned helm: $SIMPO_HELM, else the cluster tier's build (make control-plane)."""
    if os.environ.get("SIMPO_HELM"):
        return os.environ["SIMPO_HELM"]
    spec = importlib.util.spec_from_file_location("build_control_plane",
                                                  REPO / "tests" / "cluster" / "build_control_plane.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.bin_dir() / "helm"
    assert path.exists(), f"helm not built at {path}: run `make control-plane` (or set SIMPO_HELM)"
    return str(path)


def run_helm(*args):
    result = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def key(obj):
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def test_helm_lint_is_clean():
    output = run_helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in output


def test_chart_renders_the_same_objects_as_manifests():
    rendered = [o for o in yaml.safe_load_all(run_helm("template", "simpo-interleave", str(CHART), "--namespace",
                                                       "simpo-system", "--include-crds")) if o]
    manifests = [o for path in sorted(MANIFESTS.glob("*.yaml")) for o in yaml.safe_load_all(path.read_text()) if o]
    # The release namespace is helm's (--create-namespace), not a chart object.
    manifests = [o for o in manifests if key(o) != ("Namespace", None, "simpo-system")]
    assert sorted(map(key, rendered)) == sorted(map(key, manifests))
    by_key = {key(o): o for o in manifests}
    for obj in rendered:
        assert obj == by_key[key(obj)], f"{key(obj)} differs between the chart and manifests/"


@pytest.mark.parametrize("values, check", [
    (["--set", "watchNamespaces={a,b}"], lambda objs: find(objs, "Deployment", "simpo-interleave-operator")
     ["spec"]["template"]["spec"]["containers"][0]["env"][0] == {"name": "SIMPO_WATCH_NAMESPACES", "value": "a,b"}),
    (["--set", "jobNamespaces={team-a,team-b}", "--set", "worker.serviceAccountName=trainer"],
     lambda objs: sorted(o["metadata"]["namespace"] for o in objs if o["kind"] == "ServiceAccount"
                         and o["metadata"]["name"] == "trainer") == ["team-a", "team-b"]),
    (["--set", "image.tag=9.9.9", "--set", "logLevel=debug"],
     lambda objs: find(objs, "Deployment", "simpo-interleave-operator")["spec"]["template"]["spec"]["containers"][0]
     ["image"] == "simpo-interleave/operator:9.9.9"),
])
def test_chart_values(values, check):
    objects = [o for o in yaml.safe_load_all(run_helm("template", "x", str(CHART), "--namespace", "ops", *values))
               if o]
    assert check(objects)
