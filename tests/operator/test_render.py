"""JobSet rendering: every TPU shape, multislice, suspend, CPU pools, the failure policy, and the reference golden."""

import copy
from pathlib import Path

import pytest
import yaml

from operator_testkit import REFERENCE_JOB, make_job
from simpo_operator import render, tpu
from simpo_operator.resource import load_job, validate_job
from simpo_worker.contract.api import NON_RETRYABLE_EXIT_CODES
from simpo_worker.contract.config import parse_worker_config

GOLDENS = Path(__file__).parent / "golden"


def tpu_job(slices=1, **tpu_spec):
    job = make_job("tpu-job")
    del job["spec"]["hosts"]
    job["spec"]["tpu"] = {**tpu_spec, "slices": slices}
    # A global batch that splits evenly over every slice's devices (validate_job checks it against the mesh).
    job["spec"]["config"]["trainer"]["batch_size"] = 24576
    return job


def pod_of(jobset):
    [replicated] = jobset["spec"]["replicatedJobs"]
    return replicated, replicated["template"]["spec"], replicated["template"]["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("shape", tpu.SHAPES, ids=lambda s: s.accelerator_type)
def test_every_tpu_shape_renders_its_hosts_and_chips(shape):
    _, jobset = render.render_job(tpu_job(type=shape.accelerator_type))
    replicated, job_spec, pod = pod_of(jobset)
    assert replicated["replicas"] == 1
    assert job_spec["parallelism"] == job_spec["completions"] == shape.hosts
    assert job_spec["completionMode"] == "Indexed" and job_spec["backoffLimit"] == 0
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": shape.gke_accelerator,
                                   "cloud.google.com/gke-tpu-topology": shape.topology}
    assert pod["tolerations"] == [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == shape.chips_per_host
    assert container["resources"]["requests"]["google.com/tpu"] == shape.chips_per_host
    env = env_of(container)
    assert env["SIMPO_HOSTS_PER_SLICE"] == str(shape.hosts) and env["SIMPO_NUM_SLICES"] == "1"
    assert "JAX_COORDINATOR_ADDRESS" not in env, "TPU pods use JAX's GKE detection"
    assert not any(name.startswith("MEGASCALE_") for name in env)


def test_explicit_accelerator_and_topology_render_like_the_type_name():
    by_type = render.render_job(tpu_job(type="v5p-32"))
    by_topology = render.render_job(tpu_job(accelerator="tpu-v5p-slice", topology="2x2x4"))
    assert by_type == by_topology


def test_multislice_sets_replicas_megascale_and_exclusive_node_pools():
    _, jobset = render.render_job(tpu_job(type="v5p-32", slices=2))
    replicated, job_spec, pod = pod_of(jobset)
    assert replicated["replicas"] == 2 and job_spec["parallelism"] == 4
    assert jobset["metadata"]["annotations"] == {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                 "cloud.google.com/gke-nodepool"}
    env = env_of(pod["containers"][0])
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "tpu-job-worker-0-0.tpu-job:8080"
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_PORT"] == "8080"
    assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
    assert env["SIMPO_NUM_SLICES"] == "2"


def test_cpu_pool_uses_an_explicit_coordinator_and_no_tpu_scheduling():
    _, jobset = render.render_job(make_job("cpu", hosts=3, resources={"requests": {"cpu": "2"}}))
    _, job_spec, pod = pod_of(jobset)
    assert job_spec["parallelism"] == 3
    assert "nodeSelector" not in pod and "tolerations" not in pod
    [container] = pod["containers"]
    assert container["resources"] == {"requests": {"cpu": "2"}}
    env = env_of(container)
    assert env["JAX_COORDINATOR_ADDRESS"] == "cpu-worker-0-0.cpu:8476"
    assert env["JAX_NUM_PROCESSES"] == "3"
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "cpu"}


@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_reaches_the_jobset(suspend):
    _, jobset = render.render_job(make_job(suspend=suspend))
    assert jobset["spec"]["suspend"] is suspend


def test_failure_policy_fails_fast_on_non_retryable_codes_and_restarts_otherwise():
    _, jobset = render.render_job(make_job(maxRestarts=5))
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    # Only jobs failed by the pod failure policy fail the JobSet; any other failure restarts it.
    # A disrupted pod (the Job controller's message names the DisruptionTarget rule) restarts without counting.
    assert policy["rules"] == [{"name": "restart_on_disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                                "onJobFailureReasons": ["PodFailurePolicy"],
                                "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"]},
                               {"name": "fail_on_non_retryable_exit_code", "action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]
    _, job_spec, pod = pod_of(jobset)
    assert job_spec["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In",
                                              "values": [10, 11, 12, 13, 14]}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    assert pod["terminationGracePeriodSeconds"] == 300
    assert tuple(job_spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]) == NON_RETRYABLE_EXIT_CODES


def test_configmap_is_the_worker_config_and_spec_output_dir_wins():
    configmap, jobset = render.render_job(make_job(outputDir="gs://bucket/run"))
    config = parse_worker_config(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.output_dir == "gs://bucket/run" and config.trainer.num_train_steps == 3
    _, _, pod = pod_of(jobset)
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": configmap["metadata"]["name"]}}]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/simpo"
    assert env_of(pod["containers"][0])["SIMPO_CONFIG"] == "/etc/simpo/config.yaml"


def test_owner_references_on_everything_when_the_resource_has_a_uid():
    job = make_job()
    job["metadata"]["uid"] = "1234-abcd"
    for obj in render.render_job(job):
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "simpo.dev/v1alpha1", "kind": "SimpoInterleaveJob", "name": "tiny", "uid": "1234-abcd",
            "controller": True, "blockOwnerDeletion": True}]


def test_rendering_does_not_change_its_input():
    job = make_job()
    before = copy.deepcopy(job)
    render.render_job(job)
    assert job == before


@pytest.mark.parametrize("example", ["reference-m11-v5p-32", "kueue-spot-knobs-v5p-32"])
def test_examples_match_their_golden_yaml(example):
    """The reference M11 job (v5p-32, SmolLM2, train 2 -> 128 prompts x 2048 tokens -> train 5), and the same
    through Kueue on spot with every pod knob. Regenerate after an intended change:
    simpo-interleave render manifests/examples/NAME.yaml > tests/operator/golden/NAME.rendered.yaml"""
    rendered = render.dump_objects(render.render_job(load_job(str(REFERENCE_JOB.parent / f"{example}.yaml"))))
    assert rendered == (GOLDENS / f"{example}.rendered.yaml").read_text()


def test_scheduling_knobs_are_added_to_the_tpu_ones():
    job = tpu_job(type="v5p-32")
    job["spec"]["scheduling"] = {"nodeSelector": {"pool": "a"}, "spot": True,
                                 "tolerations": [{"key": "team", "operator": "Exists"}],
                                 "affinity": {"nodeAffinity": {"x": 1}}}
    _, jobset = render.render_job(job)
    _, _, pod = pod_of(jobset)
    assert pod["nodeSelector"] == {"pool": "a", tpu.ACCELERATOR_LABEL: "tpu-v5p-slice", tpu.TOPOLOGY_LABEL: "2x2x4",
                                   "cloud.google.com/gke-spot": "true"}
    assert pod["tolerations"] == [
        {"key": render.TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
        {"key": "team", "operator": "Exists"},
        {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}


def test_a_reservation_selects_its_nodes_and_tolerates_no_spot_taint():
    job = tpu_job(type="v5p-32")
    job["spec"]["scheduling"] = {"reservation": "res-1"}
    _, _, pod = pod_of(render.render_job(job)[1])
    assert pod["nodeSelector"] == {tpu.ACCELERATOR_LABEL: "tpu-v5p-slice", tpu.TOPOLOGY_LABEL: "2x2x4",
                                   "cloud.google.com/reservation-name": "res-1",
                                   "cloud.google.com/reservation-affinity": "specific"}
    assert pod["tolerations"] == [{"key": render.TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def test_pod_knobs_render_and_cannot_displace_the_operators_own():
    job = make_job(priorityClassName="low", queueName="q", workloadPriorityClassName="batch", pod={
        "labels": {"team": "a"}, "annotations": {"gke-gcsfuse/volumes": "true"},
        "env": [{"name": "XLA_FLAGS", "value": "--x"}], "envFrom": [{"secretRef": {"name": "hf"}}],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}], "imagePullSecrets": [{"name": "pull"}],
        "hostNetwork": True})
    _, jobset = render.render_job(job)
    _, job_spec, pod = pod_of(jobset)
    assert jobset["spec"]["suspend"] is True and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch"
    metadata = job_spec["template"]["metadata"]
    assert metadata["labels"]["team"] == "a" and metadata["labels"][render.JOB_LABEL] == "tiny"
    assert metadata["annotations"] == {"gke-gcsfuse/volumes": "true"}
    [container] = pod["containers"]
    assert container["env"][-1] == {"name": "XLA_FLAGS", "value": "--x"} and "SIMPO_CONFIG" in env_of(container)
    assert container["envFrom"] == [{"secretRef": {"name": "hf"}}]
    assert [v["name"] for v in pod["volumes"]] == ["config", "dshm"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/etc/simpo", "/dev/shm"]
    assert (pod["priorityClassName"], pod["imagePullSecrets"]) == ("low", [{"name": "pull"}])
    assert (pod["hostNetwork"], pod["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")


def test_reference_job_is_the_m11_workflow(reference_job):
    job = validate_job(reference_job)
    config = job.spec.config
    assert config.model.source == "smollm2"
    assert config.trainer.num_train_steps == 7 and config.inference.eval_at_steps == [2]
    assert config.inference.synthetic_prompt_count == 128 and config.inference.max_new_tokens == 2048
    assert config.inference.mode == "host_data_parallel"
    assert (job.shape.accelerator_type, job.hosts_per_slice, job.slices) == ("v5p-32", 4, 1)


def test_render_command_prints_both_objects(capsys):
    from simpo_interleave.cli import main

    assert main(["render", str(REFERENCE_JOB)]) == 0
    kinds = [obj["kind"] for obj in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "JobSet"]


def test_render_command_reports_bad_input_with_the_config_exit_code(tmp_path, capsys):
    from simpo_interleave.cli import main

    bad = make_job()
    bad["spec"]["tpu"] = {"type": "v5p-32"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["render", str(path)]) == 10
    assert "spec: set either `tpu` (a TPU slice) or `hosts` (a CPU/GPU pool), not both" in capsys.readouterr().err


def test_rendering_and_the_env_contract_need_neither_kopf_nor_kubernetes():
    """The worker image and the local runner import these; kopf and the kubernetes client are operator-only."""
    import subprocess
    import sys

    code = ("import sys; import simpo_operator.render, simpo_operator.pod_env, simpo_operator.crd, "
            "simpo_operator.status; print(sorted(m for m in ('kopf', 'kubernetes', 'jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
