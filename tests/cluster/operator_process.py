"""The product on the test cluster: the Helm chart installed with `helm install`, and the operator run as the chart's
Deployment would run it (its command and environment, its service account's token) but as a local process."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from control_plane import ControlPlane, Process, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/simpo-interleave"
RELEASE = "simpo-interleave"
RELEASE_NAMESPACE = "simpo-system"
JOBS_NAMESPACE = "simpo-jobs"  # the chart's default jobNamespaces / watchNamespaces
DEPLOYMENT = "simpo-interleave-operator"
CRD = "simpointerleavejobs.simpo.dev"


class HelmRelease:
    def __init__(self, cluster: ControlPlane):
        self.cluster = cluster
        home = cluster.workdir / "helm"
        self.env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}

    def helm(self, *args: str) -> str:
        result = subprocess.run([str(self.cluster.bin / "helm"), *args], env=self.env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def install(self) -> "HelmRelease":
        self.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace")
        self.cluster.wait_crd_established(CRD)
        return self

    def rendered(self) -> str:
        """The chart's templates as `helm template` renders them for this release."""
        return self.helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE)


class OperatorProcess:
    """`simpo-interleave operator` with the Deployment's command and env, authenticated as its service account."""

    def __init__(self, cluster: ControlPlane, name: str = "operator", env: dict | None = None):
        self.cluster, self.name, self.extra_env = cluster, name, env or {}
        self.process: Process | None = None

    def start(self) -> "OperatorProcess":
        deployment = self.cluster.get("deployment", DEPLOYMENT, "-n", RELEASE_NAMESPACE)
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        env["POD_ID"] = self.name  # the Deployment's downward API: the pod's name, unique among the replicas
        env["KUBECONFIG"] = str(self.cluster.token_kubeconfig(pod["serviceAccountName"], RELEASE_NAMESPACE, "operator"))
        env.update(self.extra_env)
        program, *args = container["command"]
        health = f"http://127.0.0.1:{free_port()}/healthz"
        self.http = f"http://127.0.0.1:{free_port()}"  # /metrics and /readyz
        argv = [str(Path(sys.executable).parent / program), *args, *container.get("args", []), "--liveness", health,
                "--metrics-port", self.http.rsplit(":", 1)[1]]
        self.process = Process(self.name, argv, self.cluster.logs, env).start()
        wait_for(lambda: urllib.request.urlopen(health, timeout=2).status == 200, 60, "the operator's liveness",
                 (self.process,))
        return self

    def readiness(self) -> tuple[int, dict]:
        """/readyz: its status code and its JSON body (ready, role)."""
        try:
            with urllib.request.urlopen(f"{self.http}/readyz", timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
