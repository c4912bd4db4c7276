"""The operator end to end on a real control plane: installed with `helm install` from charts/, run as
`simpo-interleave operator` with the chart's service-account token, driving the real JobSet controller and webhooks,
with kwok playing the TPU hosts (the worker image's tag tells it what the fake worker does: kwok_pod_stages.yaml).
"""
import copy
import json
import logging
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from operator_process import JOBS_NAMESPACE, RELEASE_NAMESPACE, REPO
from control_plane import wait_for
from dotted import changed
from simpo_interleave.local_runner import local_pods
from simpo_operator.resource import validate_job
from simpo_worker.contract.api import ENV_JOB_NAME, ENV_JOB_NAMESPACE, EXIT_CODE_MEANINGS, ExitCode, Progress
from simpo_worker.observe.progress import KubernetesStatusReporter, reporter_from_env

REFERENCE_JOB = REPO / "manifests/examples/reference-m11-v5p-32.yaml"
FAKE_WORKER = "simpo-interleave/fake-worker"
JOB_LABEL = "simpo.dev/job"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


def reference_job(image_tag: str, **spec) -> dict:
    """The reference job (manifests/examples) under a fresh name, its image a fake worker with `image_tag`."""
    job = yaml.safe_load(REFERENCE_JOB.read_text())
    job["metadata"] = {"name": f"e2e-{uuid.uuid4().hex[:8]}", "namespace": JOBS_NAMESPACE}
    job["spec"]["image"] = f"{FAKE_WORKER}:{image_tag}"
    job["spec"].pop("ttlSecondsAfterFinished", None)
    job["spec"].update(spec)
    return job


def get_job(cluster, name: str) -> dict:
    return cluster.get("sij", name, "-n", JOBS_NAMESPACE)


def get_job_in(cluster, job: dict) -> dict:
    return cluster.get("sij", job["metadata"]["name"], "-n", job["metadata"]["namespace"])


def wait_phase(cluster, operator, name: str, phases: tuple[str, ...], timeout_s: float = 120) -> dict:
    def reached():
        job = get_job(cluster, name)
        return job if job.get("status", {}).get("phase") in phases else None
    return wait_for(reached, timeout_s, f"{name} to reach {phases}", (*cluster.processes.values(), operator.process))


def owned_by(obj: dict, job: dict) -> bool:
    return any(ref["uid"] == job["metadata"]["uid"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences", []))


def pods_of(cluster, name: str) -> list[dict]:
    return cluster.get("pods", "-n", JOBS_NAMESPACE, "-l", f"{JOBSET_LABEL}={name}")["items"]


def events_for(cluster, name: str) -> list[dict]:
    return cluster.get("events", "-n", JOBS_NAMESPACE, "--field-selector",
                       f"involvedObject.kind=SimpoInterleaveJob,involvedObject.name={name}")["items"]


def condition_types(job: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in job["status"].get("conditions", [])}


def test_reference_job_runs_on_its_tpu_shape_and_succeeds(cluster, operator):
    job = reference_job("run-2s")
    cluster.apply(job)
    name = job["metadata"]["name"]
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]

    configmap = cluster.get("configmap", f"{name}-config", "-n", JOBS_NAMESPACE)
    jobset = cluster.get("jobset", name, "-n", JOBS_NAMESPACE)
    assert owned_by(configmap, done) and owned_by(jobset, done)
    # Defaulted by JobSet's mutating webhook, which the operator's rendering leaves unset.
    assert jobset["spec"]["startupPolicy"]["startupPolicyOrder"] == "AnyOrder"
    assert any(c["type"] == "Completed" and c["status"] == "True" for c in jobset["status"]["conditions"])

    pods = pods_of(cluster, name)
    # v5p-32: 4 hosts, on the v5p 2x2x4 pool only (not the v5p 2x2x2 pools of the same accelerator).
    assert len(pods) == 4
    assert {p["spec"]["nodeName"] for p in pods} == {f"v5p-32-{i}" for i in range(4)}
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)

    status = done["status"]
    assert status["jobSetName"] == name and status["hosts"] == 4 and status["restarts"] == 0
    assert status["startTime"] <= status["completionTime"]
    assert condition_types(done)["Succeeded"] == "True"
    assert condition_types(done).get("Running") == "False"
    reasons = [e["reason"] for e in events_for(cluster, name)]
    assert "Succeeded" in reasons and "Running" in reasons


def test_multislice_gets_one_node_pool_per_slice(cluster, operator, tmp_path):
    job = reference_job("run-2s", tpu={"type": "v5p-16", "slices": 2})
    cluster.apply(job)
    name = job["metadata"]["name"]
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["hosts"] == 4
    # The local runner gives each pod the environment the cluster gave the real one: its env entries resolved
    # from the annotations the JobSet and Job controllers put on it. Only the runner's stand-ins differ: the
    # config mount's path and the DNS name of slice 0 / host 0.
    local = {(pod.slice_index, pod.host_index): pod.env
             for pod in local_pods(validate_job(job), tmp_path, base_env={}, port=1)}
    # SIMPO_LOG_FORMAT: text for the runner's terminal, where pods log JSON for Cloud Logging.
    stand_ins = {"SIMPO_CONFIG", "MEGASCALE_COORDINATOR_ADDRESS", "SIMPO_LOG_FORMAT"}
    for pod in pods_of(cluster, name):
        annotations = pod["metadata"]["annotations"]
        key = (int(annotations["jobset.sigs.k8s.io/job-index"]),
               int(annotations["batch.kubernetes.io/job-completion-index"]))
        real = {}
        for entry in pod["spec"]["containers"][0]["env"]:
            if "value" in entry:
                real[entry["name"]] = entry["value"]
            else:
                field_path = entry["valueFrom"]["fieldRef"]["fieldPath"]
                real[entry["name"]] = annotations[field_path.split("'")[1]]
        assert {k: v for k, v in real.items() if k not in stand_ins} == {
            k: v for k, v in local[key].items() if k in real and k not in stand_ins}, key
        assert set(real) <= set(local[key])
    assert sorted(local) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pools_by_slice: dict[str, set[str]] = {}
    for pod in pods_of(cluster, name):
        node = cluster.get("node", pod["spec"]["nodeName"])
        pools_by_slice.setdefault(pod["metadata"]["labels"]["jobset.sigs.k8s.io/job-index"], set()).add(
            node["metadata"]["labels"]["cloud.google.com/gke-nodepool"])
    # JobSet's exclusive placement (the operator's annotation): each slice fills its own v5p 2x2x2 pool.
    assert sorted(pools_by_slice) == ["0", "1"]
    assert all(len(pools) == 1 for pools in pools_by_slice.values())
    assert set.union(*pools_by_slice.values()) == {"v5p-16-a", "v5p-16-b"}


def test_retryable_failure_restarts_the_jobset_then_recovers(cluster, operator):
    job = reference_job("run-2s-exit-42-until-attempt-1", maxRestarts=2)
    cluster.apply(job)
    name = job["metadata"]["name"]
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["restarts"] == 1
    assert condition_types(done)["Restarting"] == "False"
    restarting = [e for e in events_for(cluster, name) if e["reason"] == "Restarting"]
    assert restarting and restarting[0]["type"] == "Warning"


def test_restart_budget_exhausted_fails_with_the_reason(cluster, operator):
    job = reference_job("run-1s-exit-42", maxRestarts=1)
    cluster.apply(job)
    done = wait_phase(cluster, operator, job["metadata"]["name"], ("Succeeded", "Failed"))
    status = done["status"]
    assert status["phase"] == "Failed" and status["restarts"] == 1
    assert status["reason"] == "ReachedMaxRestarts", status
    assert status["completionTime"]
    # The Job failed by its backoff limit names no pod: the operator found the failed host among its pods.
    assert_names_a_failed_host(cluster, job["metadata"]["name"], status["message"], 42)


@pytest.mark.parametrize("disrupted", [True, False], ids=["disrupted", "not_disrupted"])
def test_a_disrupted_pod_restarts_the_jobset_without_spending_max_restarts(cluster, operator, disrupted):
    """A worker stopped by preemption or maintenance exits PREEMPTED on a pod with the DisruptionTarget condition:
    the JobSet restarts and the restart does not count (maxRestarts 0 would fail it). The same exit without the
    condition is an ordinary, counted failure."""
    tag = f"run-1s-exit-{int(ExitCode.PREEMPTED)}{'-disrupted' if disrupted else ''}-until-attempt-1"
    job = reference_job(tag, maxRestarts=0)
    cluster.apply(job)
    name = job["metadata"]["name"]
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"), timeout_s=180)
    jobset = cluster.get("jobset", name, "-n", JOBS_NAMESPACE)
    if disrupted:
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert jobset["status"]["restarts"] == 1, jobset["status"]
        assert jobset["status"].get("restartsCountTowardsMax", 0) == 0, jobset["status"]
    else:
        assert done["status"]["phase"] == "Failed" and done["status"]["reason"] == "ReachedMaxRestarts", done
        assert_names_a_failed_host(cluster, name, done["status"]["message"], int(ExitCode.PREEMPTED))


def assert_names_a_failed_host(cluster, name: str, message: str, code: int) -> None:
    """`message` starts with "host H (pod P) exited CODE: <meaning>", P a pod of the job that exited CODE, H its
    completion index."""
    match = re.match(r"host (\d+) \(pod ([a-z0-9.-]+)\) exited (\d+): ", message)
    assert match, message
    meaning = EXIT_CODE_MEANINGS[ExitCode(code)] if code in EXIT_CODE_MEANINGS else "not one of the worker's exit codes"
    assert message[match.end():].startswith(meaning) and int(match.group(3)) == code, message
    [pod] = [p for p in pods_of(cluster, name) if p["metadata"]["name"] == match.group(2)]
    assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == match.group(1)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == code


@pytest.mark.parametrize("code", [ExitCode.BAD_DATA, ExitCode.OUT_OF_MEMORY])
def test_non_retryable_exit_code_fails_at_once(cluster, operator, code):
    job = reference_job(f"run-1s-exit-{int(code)}", maxRestarts=3)  # a non-retryable worker error (api.ExitCode)
    cluster.apply(job)
    done = wait_phase(cluster, operator, job["metadata"]["name"], ("Succeeded", "Failed"))
    status = done["status"]
    assert status["phase"] == "Failed" and status["restarts"] == 0, status
    # JobSet's FailJobSet action, from the operator's rule for the pod failure policy's FailJob.
    assert status["reason"] == "FailJobSetFailurePolicyAction", status
    # The operator read the failed host and its exit code from the failed Job (the Job controller's condition) and
    # its pods, and says what the code means.
    assert_names_a_failed_host(cluster, job["metadata"]["name"], status["message"], code)


def test_suspend_and_resume(cluster, operator):
    job = reference_job("run-60s")
    cluster.apply(job)
    name = job["metadata"]["name"]
    wait_phase(cluster, operator, name, ("Running",))

    cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_phase(cluster, operator, name, ("Suspended",))
    assert cluster.get("jobset", name, "-n", JOBS_NAMESPACE)["spec"]["suspend"] is True
    wait_for(lambda: not pods_of(cluster, name), 60, "the suspended job's pods to go away")

    cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    resumed = wait_phase(cluster, operator, name, ("Running",))
    assert condition_types(resumed)["Suspended"] == "False"
    assert len(pods_of(cluster, name)) == 4
    cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE, "--wait=false")


def test_delete_cascades_to_everything_it_created(cluster, operator):
    job = reference_job("run-60s")
    cluster.apply(job)
    name = job["metadata"]["name"]
    wait_phase(cluster, operator, name, ("Running",))
    assert cluster.get("jobs", "-n", JOBS_NAMESPACE, "-l", f"{JOBSET_LABEL}={name}")["items"]

    cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE)

    def all_gone() -> bool:
        leftovers = [kind for kind, selector in (("jobset", f"{JOB_LABEL}={name}"), ("jobs", f"{JOBSET_LABEL}={name}"),
                                                 ("pods", f"{JOBSET_LABEL}={name}"),
                                                 ("configmaps", f"{JOB_LABEL}={name}"))
                     if cluster.get(kind, "-n", JOBS_NAMESPACE, "-l", selector)["items"]]
        return not leftovers
    wait_for(all_gone, 90, f"garbage collection of {name}'s JobSet, Jobs, pods and ConfigMap")


def test_operator_killed_mid_reconcile_converges_without_duplicates(cluster, operator):
    job = reference_job("run-5s")
    name = job["metadata"]["name"]
    cluster.apply(job)
    # Kill it hard as soon as it has created the JobSet, before it has seen the JobSet run.
    wait_for(lambda: cluster.kubectl("get", "jobset", name, "-n", JOBS_NAMESPACE, check=False).returncode == 0,
             60, f"the operator to create {name}'s JobSet", (operator.process,), interval_s=0.05)
    operator.process.popen.send_signal(signal.SIGKILL)
    operator.process.popen.wait(10)
    time.sleep(2)
    operator.start()
    done = wait_phase(cluster, operator, name, ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert len(cluster.get("jobset", "-n", JOBS_NAMESPACE, "-l", f"{JOB_LABEL}={name}")["items"]) == 1
    assert len(cluster.get("configmaps", "-n", JOBS_NAMESPACE, "-l", f"{JOB_LABEL}={name}")["items"]) == 1
    assert done["status"]["jobSetName"] == name and done["status"]["restarts"] == 0


def _rejected(cluster, manifest: dict) -> str:
    result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"accepted: {manifest['spec']}"
    return result.stderr


def _patch_rejected(cluster, name: str, patch: dict) -> str:
    result = cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", json.dumps(patch),
                             check=False)
    assert result.returncode != 0, f"accepted: {patch}"
    return result.stderr


TINY_ARCHITECTURE = {"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_layers": 1, "num_heads": 2,
                     "num_kv_heads": 1}


def served_rules(crd: dict) -> dict[tuple[str, str], tuple[str, str]]:
    """Every CEL rule the API server serves, by its place in the schema and its expression -> (the field path its
    refusals name, as a regular expression, and its message)."""
    rules = {}

    def collect(schema: dict, location: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            path = location + rule.get("fieldPath", "")
            rules[(location, rule["rule"])] = (re.escape(path).replace(r"\[\]", r"\[\d+\]"), rule["message"])
        for name, child in schema.get("properties", {}).items():
            collect(child, f"{location}.{name}" if location else name)
        if "items" in schema:
            collect(schema["items"], f"{location}[]")
    collect(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    return rules


def refused_by(rules: dict[tuple[str, str], tuple[str, str]], refusal: str) -> set[tuple[str, str]]:
    """The rules (place, expression) whose refusal the API server's answer holds: `<path>: Invalid value:
    <message>` as kube-apiserver 1.36 writes it for an object or a list, `<path>: Invalid value: <value>:
    <message>` for a scalar (a rule on the resource itself: its message alone)."""
    return {rule for rule, (path, message) in rules.items()
            if message in refusal and (not path or re.search(
                rf"{path}: Invalid value: (?:.*?: )?{re.escape(message)}", refusal))}


def test_every_cel_rule_rejects_what_it_should(cluster, operator):
    rules = served_rules(cluster.get("crd", "simpointerleavejobs.simpo.dev"))

    base = reference_job("run-1s", suspend=True)
    arch = changed(changed(base, "spec.config.model", {"architecture": TINY_ARCHITECTURE}), "spec.config.tokenizer",
                   "smollm2")
    on_create = [  # (fragment of the message, a resource the rule must refuse at creation)
        ("metadata.name: at most 40 characters", changed(base, "metadata.name", "n" * 41)),
        ("(a CPU/GPU pool), not both", changed(base, "spec.hosts", 2)),
        ("set spec.outputDir or spec.config.output_dir", changed(base, "spec.outputDir", None)),
        ("`accelerator` + `topology`, not both", changed(base, "spec.tpu.accelerator", "tpu-v5p-slice")),
        ("or both `accelerator` and `topology`", changed(base, "spec.tpu", {"accelerator": "tpu-v5p-slice"})),
        ("must be >= 1 or -1", changed(base, "spec.config.trainer.mesh", {"fsdp": 0})),
        ("must be >= 1 or -1", changed(base, "spec.config.trainer.mesh", {"data": 0})),
        ("must be >= 1 or -1", changed(base, "spec.config.trainer.mesh", {"model": 0})),
        ("at most one axis may be -1", changed(base, "spec.config.trainer.mesh", {"fsdp": -1})),
        ("must divide batch_size", changed(base, "spec.config.trainer.microbatches", 3)),
        ("file patterns must not be empty", changed(base, "spec.config.data.train_files", [""])),
        ("file patterns must not be empty", changed(base, "spec.config.data.eval_files", ["/eval.jsonl", ""])),
        ("must be < 0.5", changed(base, "spec.config.simpo.label_smoothing", 0.5)),
        ("steps must be positive", changed(base, "spec.config.inference.eval_at_steps", [0])),
        ("steps must be unique", changed(base, "spec.config.inference.eval_at_steps", [2, 2])),
        ("steps must be positive", changed(base, "spec.config.trainer.profile_steps", [0])),
        ("steps must be unique", changed(base, "spec.config.trainer.profile_steps", [2, 2])),
        ("a step is beyond the run", changed(base, "spec.config.trainer.profile_steps", [9])),
        ("stop strings must not be empty", changed(base, "spec.config.inference.stop_tokens", ["\n", ""])),
        ("set exactly one of `prompts_file` or `synthetic_prompt_count`",
         changed(base, "spec.config.inference.prompts_file", "/p.jsonl")),
        ("set exactly one of `source` (pretrained weights) or `architecture`",
         changed(base, "spec.config.model.architecture", TINY_ARCHITECTURE)),
        ("required when the model is random-init", changed(arch, "spec.config.tokenizer", None)),
        ("a step is beyond the run", changed(base, "spec.config.inference.eval_at_steps", [9])),
        ("never fires within the run", changed(changed(base, "spec.config.inference.eval_at_steps", None),
                                               "spec.config.inference.eval_every", 8)),
        ("must be <= trainer.num_train_steps", changed(base, "spec.config.optimizer.warmup_steps", 8)),
        ("held-out pairs are evaluated at the inference pauses",
         changed(changed(base, "spec.config.data.eval_files", ["/eval.jsonl"]), "spec.config.inference.eval_at_steps",
                 None)),
        ("exceeds smollm2's context", changed(base, "spec.config.inference.max_new_tokens", 8000)),
        ("exceeds the model's context", arch),
        ("must divide hidden_size", changed(arch, "spec.config.model.architecture.num_heads", 3)),
        ("rotary embeddings need an even head dim", changed(arch, "spec.config.model.architecture.head_dim", 3)),
        ("must divide num_heads", changed(arch, "spec.config.model.architecture.num_kv_heads", 3)),
        ("must be > low_freq_factor", changed(arch, "spec.config.model.architecture.rope_scaling",
                                                {"low_freq_factor": 4.0, "high_freq_factor": 1.0})),
        ("traces the inference pauses", changed(changed(base, "spec.config.inference.profile", True),
                                                "spec.config.inference.eval_at_steps", None)),
        ("`pauses` exports at the inference pauses", changed(changed(
            base, "spec.config.export", {"hf_dir": "/export", "at": ["pauses"]}), "spec.config.inference.eval_at_steps",
            None)),
        ("spec.suspend cannot be true with spec.queueName", changed(base, "spec.queueName", "tpu-queue")),
        ("it needs spec.queueName", changed(base, "spec.workloadPriorityClassName", "high")),
        ("the TPU accelerator/topology labels come from spec.tpu",
         changed(base, "spec.scheduling", {"nodeSelector": {"cloud.google.com/gke-tpu-topology": "2x2x2"}})),
        ("set `spot` or `reservation`, not both",
         changed(base, "spec.scheduling", {"spot": True, "reservation": "v5p-reservation"})),
        ("the operator sets SIMPO_CONFIG", changed(base, "spec.pod", {"env": [{"name": "SIMPO_CONFIG", "value": "/x"}]})),
        ("set `value` or `valueFrom`, not both", changed(base, "spec.pod", {"env": [
            {"name": "HF_TOKEN", "value": "x", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]})),
        ("set one of secretRef or configMapRef", changed(base, "spec.pod", {"envFrom": [
            {"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]})),
        ("labels the operator, JobSet, the Job controller or Kueue set",
         changed(base, "spec.pod", {"labels": {"kueue.x-k8s.io/queue-name": "x"}})),
        ("annotations JobSet, the Job controller or Kueue set",
         changed(base, "spec.pod", {"annotations": {"jobset.sigs.k8s.io/exclusive-topology": "x"}})),
    ]
    checked = set()
    for fragment, manifest in on_create:
        message = _rejected(cluster, manifest)
        assert fragment in message, message
        checked.update(refused_by(rules, message))

    cluster.apply(base)
    name = base["metadata"]["name"]
    cpu_job = reference_job("run-1s", suspend=True, hosts=2)
    del cpu_job["spec"]["tpu"]
    cluster.apply(cpu_job)
    # Queued (no Kueue runs here: its JobSet stays suspended), with every create-only knob set.
    queued = reference_job("run-1s", queueName="tpu-queue", workloadPriorityClassName="high",
                           priorityClassName="high", scheduling={"spot": True}, pod={"labels": {"team": "a"}})
    cluster.apply(queued)
    queued_name = queued["metadata"]["name"]
    on_update = {  # (job, patch) the rule must refuse as an update
        "spec.queueName is immutable": (queued_name, {"spec": {"queueName": "other"}}),
        "spec.workloadPriorityClassName is immutable": (queued_name, {"spec": {"workloadPriorityClassName": "low"}}),
        "spec.priorityClassName is immutable": (queued_name, {"spec": {"priorityClassName": "low"}}),
        "spec.scheduling is immutable": (queued_name, {"spec": {"scheduling": {"spot": False}}}),
        "spec.pod is immutable": (queued_name, {"spec": {"pod": {"labels": {"team": "b"}}}}),
        "spec.tpu is immutable": (name, {"spec": {"tpu": {"type": "v5p-16"}}}),
        "spec.image is immutable": (name, {"spec": {"image": f"{FAKE_WORKER}:other"}}),
        "spec.outputDir is immutable": (name, {"spec": {"outputDir": "gs://elsewhere/x"}}),
        "spec.serviceAccountName is immutable": (name, {"spec": {"serviceAccountName": "someone-else"}}),
        "spec.maxRestarts is immutable": (name, {"spec": {"maxRestarts": 9}}),
        "spec.hosts is immutable": (cpu_job["metadata"]["name"], {"spec": {"hosts": 3}}),
        "spec.tpu and spec.hosts cannot be added or removed after creation": (
            cpu_job["metadata"]["name"], {"spec": {"hosts": None, "tpu": {"type": "v5p-32"}}}),
        "spec.queueName cannot be added or removed after creation": (queued_name, {"spec": {"queueName": None}}),
    }
    for fragment, (job_name, patch) in on_update.items():
        message = _patch_rejected(cluster, job_name, patch)
        assert fragment in message, message
        checked.update(refused_by(rules, message))
    assert checked == set(rules), f"CEL rules without a refusal here: {sorted(set(rules) - checked)}"
    # What stays editable: suspend.
    cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    for job_name in (name, cpu_job["metadata"]["name"], queued_name):
        cluster.kubectl("delete", "sij", job_name, "-n", JOBS_NAMESPACE, "--wait=false")


def test_bounds_and_patterns_are_enforced_by_the_apiserver(cluster, operator):
    base = reference_job("run-1s", suspend=True)
    for path, value, fragment in [
        ("spec.config.trainer.batch_size", 0, "spec.config.trainer.batch_size: Invalid value: 0"),
        ("spec.config.optimizer.b2", 1.0, "spec.config.optimizer.b2"),
        ("spec.config.data.train_files", [], "spec.config.data.train_files"),
        ("spec.resources", {"limits": {"memory": "16 GB"}}, "spec.resources.limits.memory"),
        ("spec.serviceAccountName", "Worker_SA", "spec.serviceAccountName"),
        ("spec.outputDir", "runs/x", "spec.outputDir"),
        ("spec.config.inference.top_p", 0, "spec.config.inference.top_p"),
    ]:
        message = _rejected(cluster, changed(base, path, value))
        assert fragment in message, (path, message)


def test_kubectl_explain_reads_like_documentation(cluster, operator):
    explained = {}
    for field in ("sij.spec.config.trainer", "sij.spec.config.trainer.mesh.fsdp", "sij.spec.config.inference.top_p"):
        explained[field] = cluster.kubectl("explain", field).stdout
    assert "The SimPO training run." in explained["sij.spec.config.trainer"]
    assert "num_train_steps\t<integer> -required-" in explained["sij.spec.config.trainer"]
    assert "Optimizer steps in the whole run." in explained["sij.spec.config.trainer"]
    assert "Data parallelism with params and optimizer state sharded." in explained[
        "sij.spec.config.trainer.mesh.fsdp"]
    assert "Nucleus sampling; 1: off." in explained["sij.spec.config.inference.top_p"]
    # Defaults are filled in by the API server itself.
    job = reference_job("run-1s", suspend=True)
    cluster.apply(job)
    stored = get_job(cluster, job["metadata"]["name"])["spec"]["config"]
    assert stored["trainer"]["microbatches"] == 1 and stored["inference"]["top_k"] == 0
    cluster.kubectl("delete", "sij", job["metadata"]["name"], "-n", JOBS_NAMESPACE, "--wait=false")


def test_schema_violations_are_rejected_by_the_apiserver(cluster, operator):
    base = reference_job("run-1s")
    wrong_type = copy.deepcopy(base)
    wrong_type["spec"]["maxRestarts"] = "three"
    assert "spec.maxRestarts" in _rejected(cluster, wrong_type)
    unknown_field = copy.deepcopy(base)
    unknown_field["spec"]["replicas"] = 2
    assert 'unknown field "spec.replicas"' in _rejected(cluster, unknown_field)
    unknown_config_key = copy.deepcopy(base)
    unknown_config_key["spec"]["config"]["trainer"]["num_train_stepz"] = 7
    assert "spec.config.trainer.num_train_stepz" in _rejected(cluster, unknown_config_key)
    missing_image = copy.deepcopy(base)
    del missing_image["spec"]["image"]
    assert "spec.image" in _rejected(cluster, missing_image)


def test_invalid_config_is_reported_failed_with_a_clear_message(cluster, operator):
    # What only the slice's shape can tell (the admission schema cannot): 36 pairs over v5p-32's 16 chips.
    job = reference_job("run-1s")
    job["spec"]["config"]["trainer"]["batch_size"] = 36
    cluster.apply(job)
    name = job["metadata"]["name"]
    failed = wait_phase(cluster, operator, name, ("Failed", "Running", "Pending", "Succeeded"))
    status = failed["status"]
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec", status
    assert "spec.config.trainer.batch_size" in status["message"] and "16 data-parallel devices" in status["message"]
    assert cluster.kubectl("get", "jobset", name, "-n", JOBS_NAMESPACE, check=False).returncode != 0

    bad_tpu = reference_job("run-1s")
    bad_tpu["spec"]["tpu"] = {"type": "v5p-33"}
    cluster.apply(bad_tpu)
    failed = wait_phase(cluster, operator, bad_tpu["metadata"]["name"], ("Failed", "Running", "Pending"))
    assert failed["status"]["reason"] == "InvalidSpec" and "spec.tpu.type" in failed["status"]["message"]


def test_worker_token_patches_progress_and_nothing_else(cluster, operator):
    job = reference_job("run-30s")
    cluster.apply(job)
    name = job["metadata"]["name"]
    wait_phase(cluster, operator, name, ("Running",))
    as_worker = cluster.token_kubeconfig(job["spec"]["serviceAccountName"], JOBS_NAMESPACE, "worker")
    progress = {"stage": "infer", "step": 2, "totalSteps": 7, "promptsDone": 64, "promptsTotal": 128, "tokens": 1234}
    cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"progress": progress}}), kubeconfig_path=as_worker)
    assert get_job(cluster, name)["status"]["progress"] == progress

    forbidden = [
        ("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":true}}'),
        ("delete", "sij", name, "-n", JOBS_NAMESPACE),
        ("get", "configmap", f"{name}-config", "-n", JOBS_NAMESPACE),
        ("get", "pods", "-n", JOBS_NAMESPACE),
        ("get", "jobset", name, "-n", JOBS_NAMESPACE),
        ("create", "configmap", "sneaky", "-n", JOBS_NAMESPACE),
        ("get", "sij", "-n", RELEASE_NAMESPACE),
        ("get", "secrets", "-n", JOBS_NAMESPACE),
    ]
    for args in forbidden:
        result = cluster.kubectl(*args, kubeconfig_path=as_worker, check=False)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (args, result.stdout, result.stderr)
    # The operator's own status writes leave the worker's progress alone.
    cluster.kubectl("patch", "sij", name, "-n", JOBS_NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    suspended = wait_phase(cluster, operator, name, ("Suspended",))
    assert suspended["status"]["progress"] == progress
    cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE, "--wait=false")


def test_worker_reporter_patches_progress_with_its_own_token_and_is_refused_elsewhere(cluster, chart, namespace,
                                                                                     tmp_path, caplog):
    """The worker leader's own reporter (simpo_worker.observe.progress), set up from a pod's environment and
    service-account files holding a token that the TokenRequest API minted for the chart's worker ServiceAccount."""
    job = reference_job("run-1s", suspend=True)
    other = copy.deepcopy(job)  # a job of another namespace, which the worker's RoleBinding does not reach
    other["metadata"]["namespace"] = namespace
    cluster.apply([job, other])
    name = job["metadata"]["name"]
    token = cluster.token(job["spec"]["serviceAccountName"], JOBS_NAMESPACE)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(cluster.ca.pem)
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    pod_env = {ENV_JOB_NAME: name, ENV_JOB_NAMESPACE: JOBS_NAMESPACE, "KUBERNETES_SERVICE_HOST": host,
               "KUBERNETES_SERVICE_PORT": port}
    reporter = reporter_from_env(pod_env, service_account_dir=str(account))
    assert isinstance(reporter, KubernetesStatusReporter)

    before = datetime.now(timezone.utc).replace(microsecond=0)
    reporter.report(Progress(stage="done", step=7, totalSteps=7))
    progress = get_job(cluster, name)["status"]["progress"]
    stamped = datetime.strptime(progress.pop("updateTime"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert progress == {"stage": "done", "step": 7, "totalSteps": 7}
    assert before <= stamped <= datetime.now(timezone.utc)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    # The same reporter and token for the other namespace's job: refused, and the refusal is logged (not raised).
    reporter_from_env({**pod_env, ENV_JOB_NAMESPACE: namespace}, service_account_dir=str(account)).report(
        Progress(stage="train", step=1, totalSteps=7))
    [refused] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "HTTP 403: " in refused and 'cannot patch resource "simpointerleavejobs/status"' in refused, refused
    assert "progress" not in (get_job_in(cluster, other).get("status") or {})

    def status_code(method: str, path: str, body: dict | None = None) -> int:
        request = urllib.request.Request(f"{cluster.server}{path}", method=method, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
            data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=10, context=reporter.context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
    job_path = reporter.url.removeprefix(cluster.server).removesuffix("/status")
    assert status_code("GET", f"{job_path}/status") == 200  # its grant: get and patch its job's status
    assert status_code("PATCH", job_path, {"spec": {"suspend": False}}) == 403  # the spec
    assert status_code("GET", f"/api/v1/namespaces/{JOBS_NAMESPACE}/secrets") == 403  # another resource
    assert status_code("GET", f"/api/v1/namespaces/{JOBS_NAMESPACE}/pods") == 403
    assert get_job(cluster, name)["spec"]["suspend"] is True
    cluster.kubectl("delete", "sij", name, "-n", JOBS_NAMESPACE, "--wait=false")


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 floats: kustomize (Go) writes 1e-05, which PyYAML's YAML 1.1 rules read as a string."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


# Labels only Helm sets (the plain manifests carry every other label of the chart's objects).
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def _without_helm_labels(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    for labels in (obj["metadata"].get("labels"), obj.get("spec", {}).get("template", {}).get("metadata", {}).get(
            "labels")):
        for name in HELM_LABELS:
            (labels or {}).pop(name, None)
    return obj


def _normalised(objects: list[dict]) -> dict[tuple, dict]:
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): _without_helm_labels(o)
            for o in objects if o}


def test_kubectl_apply_manifests_gives_the_same_objects_as_the_chart(cluster, operator, chart):
    crds = [o for path in sorted((REPO / "charts/simpo-interleave/crds").glob("*.yaml"))
            for o in yaml.safe_load_all(path.read_text())]
    from_chart = _normalised([*yaml.safe_load_all(chart.rendered()), *crds])
    from_manifests = _normalised(list(yaml.load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout,
                                                    Loader=Yaml12Loader)))
    # `helm install --create-namespace` makes the release namespace; kubectl needs it in manifests/.
    del from_manifests[("Namespace", None, RELEASE_NAMESPACE)]
    assert from_manifests.keys() == from_chart.keys()
    for key, obj in from_manifests.items():
        assert obj == from_chart[key], key
    # And the API server agrees: applying the kustomize base over the helm release changes nothing.
    dry_run = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-k",
                              str(REPO / "manifests"), "-o", "json").stdout
    applied = json.loads(dry_run)
    for obj in applied.get("items", [applied]):
        if (obj["kind"], obj["metadata"]["name"]) == ("Namespace", RELEASE_NAMESPACE):
            continue
        live = cluster.get(obj["kind"], obj["metadata"]["name"],
                           *(["-n", obj["metadata"]["namespace"]] if obj["metadata"].get("namespace") else []))
        for field in ("spec", "rules", "roleRef", "subjects", "data"):
            assert obj.get(field) == live.get(field), (obj["kind"], obj["metadata"]["name"], field)
        assert _without_helm_labels(obj)["metadata"].get("labels") == \
            _without_helm_labels(live)["metadata"].get("labels"), obj["metadata"]["name"]


def test_kubectl_get_sij_shows_the_printer_columns(cluster, operator):
    job = reference_job("run-1s", maxRestarts=1)
    cluster.apply(job)
    name = job["metadata"]["name"]
    wait_phase(cluster, operator, name, ("Succeeded",))
    table = cluster.kubectl("get", "sij", name, "-n", JOBS_NAMESPACE).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "STAGE", "STEP", "RESTARTS", "AGE"]
    assert table[1].split()[:2] == [name, "Succeeded"]
    wide = cluster.kubectl("get", "simpointerleavejobs", name, "-n", JOBS_NAMESPACE, "-o", "wide").stdout.splitlines()
    assert {"STEPS", "HOSTS", "REASON"} <= set(wide[0].split())
    assert "4" in wide[1].split()  # hosts
