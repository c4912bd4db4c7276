"""Operator reconcile latency under load, on the cluster tier's real control plane (a benchmark, not a test).

Starts the loopback control plane (tests/cluster), installs the chart with helm, runs the operator as the chart's
service account, creates N SimpoInterleaveJobs at once (small CPU jobs whose fake workers exit 0 after a second)
and reports, side by side: the floor (the same JobSets created by this client directly, before the operator
starts), the operator's latency from each create request to its JobSet appearing in a watch, and
the JobSet controller's own latency from that JobSet appearing to its first Job appearing (p50/p99/max: both on
the same machine in the same run, so its load shows in both); the time until every job reached Succeeded; the
operator's CPU time per job (user + system, from /proc) and its peak resident memory (VmHWM).

    python bench/operator_load.py [--jobs 100] [--rounds 2]      (needs `make control-plane` first)
"""
import argparse
import os
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
import urllib3
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/cluster"))
from control_plane import ControlPlane, wait_for  # noqa: E402
from operator_process import JOBS_NAMESPACE, REPO, HelmRelease, OperatorProcess  # noqa: E402
from simpo_operator.render import JOB_LABEL, render_job  # noqa: E402

SMALL_JOB = REPO / "manifests/examples/small-cpu.yaml"
CLIENT_THREADS = 16  # this benchmark's concurrent create requests
WATCH_TIMEOUT_S = 600


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


JOBSETS = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
# Jobs as plain JSON too (batch/v1 through the custom-objects API): BatchV1Api's watch builds a V1Job model of each
# event in this process, whose CPU delayed the JobSet watch's timestamps (by 0.3 s at p50 once the operator created
# the JobSets as fast as the floor).
BATCH_JOBS = ("batch", "v1", "jobs")


def own_name(obj: dict) -> str:
    return obj["metadata"]["name"]


def jobset_of_job(obj: dict) -> str:
    return (obj["metadata"].get("labels") or {}).get("jobset.sigs.k8s.io/jobset-name", "")


class FirstSeen(threading.Thread):
    """A watch, in a thread of its own, of when each object whose `name_of(object)` starts with `prefix` first
    appears, until `wanted` have. A watch the API server ends (its timeout, a dropped connection, a 410 Gone for a
    compacted resource version) is resumed; seen() raises any other error in the caller's thread."""

    def __init__(self, api: kubernetes.client.ApiClient, resource: tuple, name_of, prefix: str, wanted: int):
        super().__init__(daemon=True)
        self.custom, self.resource = kubernetes.client.CustomObjectsApi(api), resource
        self.name_of, self.prefix, self.wanted = name_of, prefix, wanted
        self.times: dict[str, float] = {}
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._watch()
        except Exception as error:
            self.error = error

    def _watch(self) -> None:
        group, version, plural = self.resource
        watch = kubernetes.watch.Watch()
        deadline = time.monotonic() + WATCH_TIMEOUT_S
        while len(self.times) < self.wanted and (remaining := deadline - time.monotonic()) > 0:
            try:
                for event in watch.stream(self.custom.list_namespaced_custom_object, group, version, JOBS_NAMESPACE,
                                          plural, timeout_seconds=max(1, int(remaining)),
                                          **({"resource_version": watch.resource_version}
                                             if watch.resource_version else {})):
                    name = self.name_of(event["object"])
                    if name.startswith(self.prefix):
                        self.times.setdefault(name, time.monotonic())
                    if len(self.times) == self.wanted:
                        watch.stop()
            except kubernetes.client.ApiException as error:
                if error.status != 410:
                    raise
                watch.resource_version = None  # list again: objects already seen keep their first time
            except urllib3.exceptions.ProtocolError:
                pass  # the connection dropped: resume from the last resource version

    def seen(self) -> dict[str, float]:
        """When each object was first seen, once the watch has ended."""
        self.join(timeout=WATCH_TIMEOUT_S)
        if self.error is not None:
            raise RuntimeError(f"the watch of {self.resource[2]} failed") from self.error
        return self.times


def load_round(api: kubernetes.client.ApiClient, operator: OperatorProcess, jobs: int) -> dict:
    """Create `jobs` SimpoInterleaveJobs at once and measure them until every one has Succeeded."""
    custom = kubernetes.client.CustomObjectsApi(api)
    prefix = f"load-{uuid.uuid4().hex[:4]}"
    names = [f"{prefix}-{i:03d}" for i in range(jobs)]
    created_at: dict[str, float] = {}
    watchers = [FirstSeen(api, JOBSETS, own_name, prefix, jobs),
                FirstSeen(api, BATCH_JOBS, jobset_of_job, prefix, jobs)]  # by JobSet name: its first Job
    for watcher in watchers:
        watcher.start()
    time.sleep(1)  # let the watches start before the first create

    def create(name: str) -> None:
        created_at[name] = time.monotonic()  # when the create request is sent
        custom.create_namespaced_custom_object("simpo.dev", "v1alpha1", JOBS_NAMESPACE, "simpointerleavejobs",
                                               job_manifest(name))

    pid = operator.process.popen.pid
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        list(pool.map(create, names))
    create_s = time.monotonic() - start
    jobset_seen_at, batch_job_seen_at = (watcher.seen() for watcher in watchers)
    missing = [n for n in names if n not in jobset_seen_at or n not in batch_job_seen_at]
    if missing:
        raise RuntimeError(f"{len(missing)} jobs never got a JobSet and its Jobs, e.g. {missing[:5]}")

    def all_succeeded() -> bool:
        items = custom.list_namespaced_custom_object("simpo.dev", "v1alpha1", JOBS_NAMESPACE,
                                                     "simpointerleavejobs")["items"]
        phases = [i.get("status", {}).get("phase") for i in items if i["metadata"]["name"].startswith(prefix)]
        return len(phases) == jobs and all(p == "Succeeded" for p in phases)

    wait_for(all_succeeded, 600, f"all {jobs} jobs to succeed", (operator.process,), interval_s=1)
    result = {"create_s": create_s, "all_done_s": time.monotonic() - start,
              "operator": [jobset_seen_at[n] - created_at[n] for n in names],
              "jobset": [batch_job_seen_at[n] - jobset_seen_at[n] for n in names],
              "cpu_per_job_ms": (cpu_seconds(pid) - cpu_before) / jobs * 1000, "rss_mib": peak_rss_mib(pid)}
    for name in names:  # the next round starts from an empty namespace
        custom.delete_namespaced_custom_object("simpo.dev", "v1alpha1", JOBS_NAMESPACE, "simpointerleavejobs", name)
    return result


def direct_round(api: kubernetes.client.ApiClient, jobs: int) -> dict:
    """The floor under the operator's latency on this machine: the same JobSets created by this client directly
    (CLIENT_THREADS threads, no operator running), from each create request to the JobSet appearing in a watch."""
    custom = kubernetes.client.CustomObjectsApi(api)
    prefix = f"direct-{uuid.uuid4().hex[:4]}"
    names = [f"{prefix}-{i:03d}" for i in range(jobs)]
    jobsets = {}
    for name in names:
        jobset = render_job(job_manifest(name))[1]
        del jobset["metadata"]["labels"][JOB_LABEL]  # not the operator's to follow
        jobsets[name] = jobset
    created_at: dict[str, float] = {}
    watcher = FirstSeen(api, JOBSETS, own_name, prefix, jobs)
    watcher.start()
    time.sleep(1)

    def create(name: str) -> None:
        created_at[name] = time.monotonic()
        custom.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", JOBS_NAMESPACE, "jobsets",
                                               jobsets[name])

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        list(pool.map(create, names))
    seen_at = watcher.seen()
    if len(seen_at) != jobs:
        raise RuntimeError(f"only {len(seen_at)} of {jobs} JobSets created directly were seen")
    result = {"latency": [seen_at[n] - created_at[n] for n in names], "all_s": max(seen_at.values()) - start}
    for name in names:
        custom.delete_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", JOBS_NAMESPACE, "jobsets", name,
                                               propagation_policy="Background")
    return result


def report_direct(jobs: int, result: dict) -> None:
    latency = result["latency"]
    print(f"\nfloor: {jobs} JobSets created directly by a {CLIENT_THREADS}-thread client, no operator (load average "
          f"{os.getloadavg()[0]:.1f}): request -> JobSet p50 {statistics.median(latency) * 1000:.0f} ms, p99 "
          f"{percentile(latency, 0.99) * 1000:.0f} ms, max {max(latency) * 1000:.0f} ms; the last seen after "
          f"{result['all_s']:.1f} s", flush=True)


def report(jobs: int, number: int, result: dict) -> None:
    print(f"\nround {number}: {jobs} SimpoInterleaveJobs created at once ({CLIENT_THREADS} client threads, "
          f"{result['create_s']:.1f}s to create); load average {os.getloadavg()[0]:.1f}")
    print("| latency | operator: create -> JobSet | JobSet controller: JobSet -> first Job |")
    print("| --- | --- | --- |")
    for label, pick in (("p50", statistics.median), ("p99", lambda v: percentile(v, 0.99)), ("max", max)):
        print(f"| {label} | {pick(result['operator']) * 1000:.0f} ms | {pick(result['jobset']) * 1000:.0f} ms |")
    print(f"all {jobs} Succeeded after {result['all_done_s']:.1f} s; operator CPU time {result['cpu_per_job_ms']:.1f} "
          f"ms per job (create to Succeeded); operator peak RSS (VmHWM) {result['rss_mib']:.0f} MiB", flush=True)


def run(jobs: int, rounds: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="simpo-operator-load-"))
    cluster = ControlPlane(workdir).start()
    try:
        HelmRelease(cluster).install()
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(cluster.admin_kubeconfig), client_configuration=configuration)
        # A kept-alive connection per thread and watch: beyond the pool's size (CPUs x 5 by default) each request
        # opens a TLS connection of its own and closes it, work for the API server in the middle of the burst.
        configuration.connection_pool_maxsize = CLIENT_THREADS + 3
        api = kubernetes.client.ApiClient(configuration)
        report_direct(jobs, direct_round(api, jobs))
        operator = OperatorProcess(cluster).start()
        for number in range(1, rounds + 1):
            report(jobs, number, load_round(api, operator, jobs))
        operator.stop()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="load rounds on the same cluster and operator")
    arguments = parser.parse_args()
    run(arguments.jobs, arguments.rounds)
