"""A real Kubernetes control plane on loopback, started the way controller-runtime's envtest does it.

etcd, kube-apiserver (RBAC, service-account tokens), kube-controller-manager (garbage collection, Jobs, service
accounts, namespaces), kube-scheduler, the JobSet controller with its webhooks registered by url + caBundle, and kwok
playing kubelet for fake GKE TPU nodes. Every process runs in its own process group and dies with its parent.
Binaries come from tests/cluster/build_control_plane.py. Kueue runs on demand (start_kueue / stop_kueue): its
webhooks see every JobSet, so only the tests that submit through it pay for them.
"""
import atexit
import base64
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from certs import CertificateAuthority, service_account_keys
import build_control_plane

HERE = Path(__file__).resolve().parent
POD_STAGES = HERE / "kwok_pod_stages.yaml"
SERVICE_CIDR = "10.0.0.0/24"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Kueue v0.17 reads its metrics serving cert from this fixed path when its internal cert management is off (the
# path its Deployment mounts a Secret at); internal cert management would issue certs for a Service name, which a
# webhook called by url on loopback cannot use.
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
KUEUE_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "jobset.x-k8s.io"}
TPU_TAINT = {"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class NodePool:
    """A GKE node pool: a TPU slice shape (one node per TPU VM host) or plain CPU nodes."""
    name: str
    hosts: int
    accelerator: str | None = None   # cloud.google.com/gke-tpu-accelerator
    topology: str | None = None      # cloud.google.com/gke-tpu-topology
    chips_per_host: int = 0
    machine_type: str = "n2-standard-8"


# GKE TPU node pools of three slice shapes: v5p-32 (the reference job), v5p-16 twice (multislice, and the same
# accelerator as v5p-32 with another topology), v6e-16; and a CPU pool for `spec.hosts` jobs.
DEFAULT_POOLS = (
    NodePool("v5p-32", hosts=4, accelerator="tpu-v5p-slice", topology="2x2x4", chips_per_host=4,
             machine_type="ct5p-hightpu-4t"),
    NodePool("v5p-16-a", hosts=2, accelerator="tpu-v5p-slice", topology="2x2x2", chips_per_host=4,
             machine_type="ct5p-hightpu-4t"),
    NodePool("v5p-16-b", hosts=2, accelerator="tpu-v5p-slice", topology="2x2x2", chips_per_host=4,
             machine_type="ct5p-hightpu-4t"),
    NodePool("v6e-16", hosts=4, accelerator="tpu-v6e-slice", topology="4x4", chips_per_host=4,
             machine_type="ct6e-standard-4t"),
    NodePool("cpu", hosts=2),
)


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel kills the child when the test process dies, even by SIGKILL.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Process:
    """One long-running program in its own process group, output in `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **(self.env or {})}, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def check_running(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            code = None if self.popen is None else self.popen.returncode
            raise ClusterError(f"{self.name} is not running (exit code {code}); {self.log_path} ends:\n"
                               f"{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(grace_s)


def wait_for(condition, timeout_s: float, what: str, watch: tuple[Process, ...] = (), interval_s: float = 0.2):
    """Poll `condition` until it returns something truthy; fail after `timeout_s` or when a watched process dies."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        for process in watch:
            process.check_running()
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, ClusterError) as e:
            last_error = e
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}" +
                       (f" (last error: {last_error})" if last_error else ""))


def kubeconfig(server: str, ca_pem: bytes, user: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}]}


class ControlPlane:
    def __init__(self, workdir: Path, pools: tuple[NodePool, ...] = DEFAULT_POOLS):
        self.workdir, self.pools = workdir, pools
        self.bin = build_control_plane.built_dir()
        self.processes: dict[str, Process] = {}
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pki = workdir / "pki"
        self.pki.mkdir(exist_ok=True)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "ControlPlane":
        atexit.register(self.stop)
        try:
            self._make_certs()
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._start_jobset()
            self._start_kwok()
            self._create_nodes()
            wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
                     .returncode == 0, 60, "the default service account", tuple(self.processes.values()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def check_running(self) -> None:
        for process in self.processes.values():
            process.check_running()

    def _run(self, name: str, argv: list[str], env: dict | None = None) -> Process:
        process = Process(name, argv, self.logs, env).start()
        self.processes[name] = process
        return process

    def restart(self, name: str) -> None:
        """Stop and start one component again with the same command line (e.g. to test recovery)."""
        process = self.processes[name]
        process.stop()
        process.start()

    # -- clients -------------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, kubeconfig_path: Path | None = None, input: str | None = None,
                check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.bin / "kubectl"), "--kubeconfig", str(kubeconfig_path or self.admin_kubeconfig),
                                 *args], input=input, capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def apply(self, manifest: dict | list | str, namespace: str | None = None) -> None:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(
            manifest if isinstance(manifest, list) else [manifest])
        self.kubectl("apply", "--server-side", *(["-n", namespace] if namespace else []), "-f", "-", input=text)

    def get(self, *args: str, kubeconfig_path: Path | None = None) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json", kubeconfig_path=kubeconfig_path).stdout)

    def wait_crd_established(self, name: str, timeout_s: float = 60) -> None:
        wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                             for c in self.get("crd", name).get("status", {}).get("conditions") or []),
                 timeout_s, f"CRD {name} to be established")

    def token(self, service_account: str, namespace: str) -> str:
        """A fresh bound token of a service account, from the TokenRequest API (as the kubelet gets a pod's)."""
        return self.kubectl("create", "token", service_account, "-n", namespace, "--duration=2h").stdout.strip()

    def token_kubeconfig(self, service_account: str, namespace: str, name: str | None = None) -> Path:
        """A kubeconfig that authenticates as a service account with a fresh bound token (as a pod would)."""
        token = self.token(service_account, namespace)
        path = self.workdir / f"{name or namespace + '-' + service_account}.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig(self.server, self.ca.pem, {"token": token})))
        return path

    # -- components ----------------------------------------------------------------------------------------------
    def _make_certs(self) -> None:
        self.ca = CertificateAuthority(self.pki)
        self.apiserver_cert = self.ca.issue(
            "apiserver", "kube-apiserver",
            hosts=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                   "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        admin = self.ca.issue("admin", "admin", organization="system:masters", client=True)
        self.webhook_cert = self.ca.issue("jobset-webhook", "jobset-webhook", hosts=("127.0.0.1",))
        self.sa_keys = service_account_keys(self.pki)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.admin_kubeconfig = self.workdir / "admin.kubeconfig"
        self.admin_kubeconfig.write_text(yaml.safe_dump(kubeconfig(self.server, self.ca.pem, {
            "client-certificate-data": base64.b64encode(admin.cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(admin.key.read_bytes()).decode()})))
        self._admin_tls = ssl.create_default_context(cafile=str(self.ca.cert_path))
        self._admin_tls.load_cert_chain(str(admin.cert), str(admin.key))

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = self._run("etcd", [
            str(self.bin / "etcd"), "--data-dir", str(self.workdir / "etcd"), "--name", "test",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}", "--initial-cluster", f"test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--log-level", "warn"])
        wait_for(lambda: urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2).status == 200,
                 60, "etcd health", (etcd,))

    def _start_apiserver(self) -> None:
        apiserver = self._run("kube-apiserver", [
            str(self.bin / "kube-apiserver"), "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(self.port),
            "--cert-dir", str(self.pki), "--tls-cert-file", str(self.apiserver_cert.cert),
            "--tls-private-key-file", str(self.apiserver_cert.key), "--client-ca-file", str(self.ca.cert_path),
            "--authorization-mode", "RBAC", "--service-cluster-ip-range", SERVICE_CIDR,
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(self.sa_keys.cert),
            "--service-account-signing-key-file", str(self.sa_keys.key),
            "--allow-privileged=true", "--enable-priority-and-fairness=false", "--endpoint-reconciler-type=none",
            # It taints new nodes not-ready until the node lifecycle controller clears it; kwok's nodes never need it.
            "--disable-admission-plugins=TaintNodesByCondition",
            "--v=1"])
        wait_for(lambda: urllib.request.urlopen(f"{self.server}/readyz", context=self._admin_tls,
                                                timeout=5).status == 200,
                 120, "kube-apiserver /readyz", (apiserver,), interval_s=0.5)

    def _start_controllers(self) -> None:
        kubeconfig_flag = ["--kubeconfig", str(self.admin_kubeconfig)]
        self._run("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), *kubeconfig_flag, "--leader-elect=false",
            "--secure-port=0", "--use-service-account-credentials=false",
            "--controllers", "garbage-collector-controller,job-controller,serviceaccount-controller,"
                             "serviceaccount-token-controller,namespace-controller,"
                             "root-ca-certificate-publisher-controller,ttl-after-finished-controller",
            "--service-account-private-key-file", str(self.sa_keys.key), "--root-ca-file", str(self.ca.cert_path),
            "--concurrent-gc-syncs=5", "--v=1"])
        self._run("kube-scheduler", [
            str(self.bin / "kube-scheduler"), *kubeconfig_flag, "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--authentication-kubeconfig", str(self.admin_kubeconfig),
            "--authorization-kubeconfig", str(self.admin_kubeconfig), "--v=1"])

    def _start_jobset(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(self.bin / build_control_plane.JOBSET_CRD))
        self.wait_crd_established("jobsets.jobset.x-k8s.io")
        # controller-runtime looks for tls.crt/tls.key in the webhook cert dir.
        cert_dir = self.workdir / "jobset-webhook"
        cert_dir.mkdir(exist_ok=True)
        (cert_dir / "tls.crt").write_bytes(self.webhook_cert.cert.read_bytes())
        (cert_dir / "tls.key").write_bytes(self.webhook_cert.key.read_bytes())
        webhook_port, probe_port = free_port(), free_port()
        config = self.workdir / "jobset-config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False}}))
        jobset = self._run("jobset", [str(self.bin / "jobset"), "--kubeconfig", str(self.admin_kubeconfig),
                                      "--config", str(config), "--zap-log-level=info"])
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/readyz", timeout=2).status == 200,
                 60, "the JobSet controller's readyz", (jobset,))
        self.apply(self._jobset_webhooks(f"https://127.0.0.1:{webhook_port}"))

    def _jobset_webhooks(self, base_url: str) -> list[dict]:
        """JobSet's own webhook configuration (config/components/webhook), pointed at a url instead of a Service."""
        ca_bundle = base64.b64encode(self.ca.pem).decode()
        only_jobset_pods = {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]}

        def hook(name, path, group, version, resource, operations, object_selector=None):
            spec = {"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                    "clientConfig": {"url": base_url + path, "caBundle": ca_bundle},
                    "rules": [{"apiGroups": [group], "apiVersions": [version], "resources": [resource],
                               "operations": operations}]}
            if object_selector:
                spec["objectSelector"] = object_selector
            return spec

        return [
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
             "metadata": {"name": "jobset-mutating-webhook-configuration"}, "webhooks": [
                 hook("mjobset.kb.io", "/mutate-jobset-x-k8s-io-v1alpha2-jobset", "jobset.x-k8s.io", "v1alpha2",
                      "jobsets", ["CREATE"]),
                 hook("mpod.kb.io", "/mutate--v1-pod", "", "v1", "pods", ["CREATE"], only_jobset_pods)]},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
             "metadata": {"name": "jobset-validating-webhook-configuration"}, "webhooks": [
                 hook("vjobset.kb.io", "/validate-jobset-x-k8s-io-v1alpha2-jobset", "jobset.x-k8s.io", "v1alpha2",
                      "jobsets", ["CREATE", "UPDATE"]),
                 hook("vpod.kb.io", "/validate--v1-pod", "", "v1", "pods", ["CREATE"], only_jobset_pods)]},
        ]

    def start_kueue(self) -> None:
        """Kueue's manager with the JobSet integration: its CRDs, and its own webhooks for its API and JobSets."""
        kueue_bin = build_control_plane.built_kueue_dir()
        crds = sorted((kueue_bin / "kueue-crds").glob("*.yaml"))
        self.kubectl("apply", "--server-side", *[arg for crd in crds for arg in ("-f", str(crd))])
        for crd in crds:
            self.wait_crd_established(yaml.safe_load(crd.read_text())["metadata"]["name"])
        self.kubectl("create", "namespace", "kueue-system")
        cert_dir = self.workdir / "kueue-webhook"
        cert_dir.mkdir(exist_ok=True)
        for directory in (cert_dir, KUEUE_METRICS_CERT_DIR):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "tls.crt").write_bytes(self.webhook_cert.cert.read_bytes())
                (directory / "tls.key").write_bytes(self.webhook_cert.key.read_bytes())
            except OSError as error:
                raise ClusterError(f"Kueue needs its certs in {directory}: {error}") from error
        webhook_port, probe_port = free_port(), free_port()
        config = self.workdir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["jobset.x-k8s.io/jobset"]}}))
        kueue = self._run("kueue", [str(kueue_bin / "kueue"), "--config", str(config),
                                    "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"],
                          env={"KUBECONFIG": str(self.admin_kubeconfig)})
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/readyz", timeout=2).status == 200,
                 120, "Kueue's readyz", (kueue,))
        self.apply(self._kueue_webhooks(kueue_bin / "kueue-webhooks.yaml", f"https://127.0.0.1:{webhook_port}"))

    def stop_kueue(self) -> None:
        """Its webhooks go first: they fail closed, so left behind they would refuse every JobSet."""
        self.kubectl("delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration", "-l",
                     "simpo.dev/test-component=kueue")
        self.processes.pop("kueue").stop()
        self.kubectl("delete", "namespace", "kueue-system", "--wait=false")

    def _kueue_webhooks(self, manifests: Path, base_url: str) -> list[dict]:
        """Kueue's own webhook configuration (config/components/webhook) for its API and JobSets, pointed at a url
        instead of its Service."""
        ca_bundle = base64.b64encode(self.ca.pem).decode()
        configurations = []
        for configuration in yaml.safe_load_all(manifests.read_text()):
            hooks = [hook for hook in configuration["webhooks"]
                     if {group for rule in hook["rules"] for group in rule["apiGroups"]} <= KUEUE_WEBHOOK_GROUPS]
            for hook in hooks:
                hook["clientConfig"] = {"url": base_url + hook["clientConfig"]["service"]["path"],
                                        "caBundle": ca_bundle}
            configurations.append({**configuration, "webhooks": hooks, "metadata": {
                "name": f"kueue-{configuration['metadata']['name']}",
                "labels": {"simpo.dev/test-component": "kueue"}}})
        return configurations

    def _start_kwok(self) -> None:
        node_stage = self.bin / "kwok-stages/node/fast/node-initialize.yaml"
        self._run("kwok", [
            str(self.bin / "kwok"), "--kubeconfig", str(self.admin_kubeconfig),
            "--config", str(node_stage), "--config", str(POD_STAGES),
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{free_port()}", "--node-ip=127.0.0.1", "--cidr=10.64.0.0/16"])

    def _create_nodes(self) -> None:
        nodes = []
        for pool in self.pools:
            for host in range(pool.hosts):
                name = f"{pool.name}-{host}"
                labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                          "type": "kwok", "cloud.google.com/gke-nodepool": pool.name,
                          "node.kubernetes.io/instance-type": pool.machine_type}
                capacity = {"cpu": "32", "memory": "128Gi", "pods": "110"}
                taints = []
                if pool.accelerator:
                    labels["cloud.google.com/gke-tpu-accelerator"] = pool.accelerator
                    labels["cloud.google.com/gke-tpu-topology"] = pool.topology
                    capacity["google.com/tpu"] = str(pool.chips_per_host)
                    taints.append(TPU_TAINT)
                nodes.append({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": name, "labels": labels,
                                           "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
                              "spec": {"taints": taints},
                              "status": {"capacity": capacity, "allocatable": capacity}})
        self.kubectl("create", "-f", "-", input=yaml.safe_dump_all(nodes))

        def all_ready() -> bool:
            items = self.get("nodes")["items"]
            return len(items) == len(nodes) and all(
                any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                for n in items)

        wait_for(all_ready, 60, "kwok to make the fake nodes Ready", tuple(self.processes.values()))
