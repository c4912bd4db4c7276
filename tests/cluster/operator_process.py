"""The product on the test cluster: the Helm chart installed with `helm install`, and the operator run as the chart's
Deployment would run it (its command and environment, its service account's token) but as a local process."""
import os
import subprocess
import sys
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

    def __init__(self, cluster: ControlPlane):
        self.cluster = cluster
        self.process: Process | None = None

    def start(self) -> "OperatorProcess":
        deployment = self.cluster.get("deployment", DEPLOYMENT, "-n", RELEASE_NAMESPACE)
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        env["KUBECONFIG"] = str(self.cluster.token_kubeconfig(pod["serviceAccountName"], RELEASE_NAMESPACE, "operator"))
        program, *args = container["command"]
        health = f"http://127.0.0.1:{free_port()}/healthz"
        argv = [str(Path(sys.executable).parent / program), *args, *container.get("args", []), "--liveness", health]
        self.process = Process("operator", argv, self.cluster.logs, env).start()
        wait_for(lambda: urllib.request.urlopen(health, timeout=2).status == 200, 60, "the operator's liveness",
                 (self.process,))
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
