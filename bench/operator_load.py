"""Operator reconcile latency under load, on the cluster tier's real control plane (a benchmark, not a test).

Starts the loopback control plane (tests/cluster), installs the chart with helm, runs the operator as the chart's
service account, creates N SimpoInterleaveJobs at once (small CPU jobs whose fake workers exit 0 after a second)
and reports: the latency from each create request to its JobSet appearing in a watch (p50/p99/max), the time
until every job reached Succeeded, and the operator's peak resident memory (VmHWM).

    python bench/operator_load.py [--jobs 100]      (needs `make control-plane` first)
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/cluster"))
from control_plane import ControlPlane, wait_for  # noqa: E402
from operator_process import JOBS_NAMESPACE, REPO, HelmRelease, OperatorProcess  # noqa: E402

SMALL_JOB = REPO / "manifests/examples/small-cpu.yaml"


def job_manifest(name: str) -> dict:
    job = yaml.safe_load(SMALL_JOB.read_text())
    job["metadata"] = {"name": name, "namespace": JOBS_NAMESPACE}
    job["spec"].update(image="simpo-interleave/fake-worker:run-1s", hosts=1, resources={})
    job["spec"].pop("ttlSecondsAfterFinished", None)
    return job


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def run(jobs: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="simpo-operator-load-"))
    cluster = ControlPlane(workdir).start()
    try:
        HelmRelease(cluster).install()
        operator = OperatorProcess(cluster).start()
        api = kubernetes.config.new_client_from_config(str(cluster.admin_kubeconfig))
        custom = kubernetes.client.CustomObjectsApi(api)
        prefix = f"load-{uuid.uuid4().hex[:4]}"
        names = [f"{prefix}-{i:03d}" for i in range(jobs)]
        created_at: dict[str, float] = {}
        jobset_seen_at: dict[str, float] = {}

        def watch_jobsets() -> None:
            watch = kubernetes.watch.Watch()
            for event in watch.stream(custom.list_namespaced_custom_object, "jobset.x-k8s.io", "v1alpha2",
                                      JOBS_NAMESPACE, "jobsets", timeout_seconds=600):
                name = event["object"]["metadata"]["name"]
                if name.startswith(prefix):
                    jobset_seen_at.setdefault(name, time.monotonic())
                if len(jobset_seen_at) == jobs:
                    watch.stop()

        watcher = threading.Thread(target=watch_jobsets, daemon=True)
        watcher.start()
        time.sleep(1)  # let the watch start before the first create

        def create(name: str) -> None:
            created_at[name] = time.monotonic()  # when the create request is sent
            custom.create_namespaced_custom_object("simpo.dev", "v1alpha1", JOBS_NAMESPACE, "simpointerleavejobs",
                                                   job_manifest(name))

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, names))
        create_s = time.monotonic() - start
        watcher.join(timeout=300)
        missing = [n for n in names if n not in jobset_seen_at]
        if missing:
            raise RuntimeError(f"{len(missing)} jobs never got a JobSet, e.g. {missing[:5]}")
        latencies = [jobset_seen_at[n] - created_at[n] for n in names]

        def all_succeeded() -> bool:
            items = custom.list_namespaced_custom_object("simpo.dev", "v1alpha1", JOBS_NAMESPACE,
                                                         "simpointerleavejobs")["items"]
            phases = [i.get("status", {}).get("phase") for i in items if i["metadata"]["name"].startswith(prefix)]
            return len(phases) == jobs and all(p == "Succeeded" for p in phases)

        wait_for(all_succeeded, 600, f"all {jobs} jobs to succeed", (operator.process,), interval_s=1)
        all_done_s = time.monotonic() - start
        rss = peak_rss_mib(operator.process.popen.pid)
        operator.stop()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\noperator load: {jobs} SimpoInterleaveJobs created at once (16 client threads, {create_s:.1f}s to "
          f"create)")
    print("| metric | value |")
    print("| --- | --- |")
    print(f"| create -> JobSet p50 | {statistics.median(latencies) * 1000:.0f} ms |")
    print(f"| create -> JobSet p99 | {percentile(latencies, 0.99) * 1000:.0f} ms |")
    print(f"| create -> JobSet max | {max(latencies) * 1000:.0f} ms |")
    print(f"| all {jobs} Succeeded after | {all_done_s:.1f} s |")
    print(f"| operator peak RSS (VmHWM) | {rss:.0f} MiB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    run(parser.parse_args().jobs)
