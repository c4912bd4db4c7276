"""Bad SimpoInterleaveJobs: each rejected field gives a ConfigError naming the field and what is allowed."""

import pytest

from operator_testkit import make_job
from simpo_operator.resource import load_job, validate_job
from simpo_worker.contract.errors import ConfigError


def tpu_job(**tpu_spec):
    job = make_job()
    del job["spec"]["hosts"]
    job["spec"]["tpu"] = tpu_spec
    return job


def with_config(**changes):
    job = make_job()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        job["spec"]["config"][section][key] = value
    return job


CASES = [
    (tpu_job(type="v5p-30"), r"^spec\.tpu\.type: unknown TPU type 'v5p-30'; valid types: v4-8, .*v5p-32"),
    (tpu_job(accelerator="tpu-v5p-slice", topology="3x3x3"),
     r"^spec\.tpu\.topology: '3x3x3' is not a v5p slice topology; valid topologies: 2x2x1, 2x2x2, 2x2x4"),
    (tpu_job(accelerator="tpu-v9", topology="2x2"), r"^spec\.tpu\.accelerator: unknown TPU accelerator 'tpu-v9'"),
    (tpu_job(type="v5p-32", topology="2x2x4"), r"^spec\.tpu: set either `type` or `accelerator` \+ `topology`"),
    (tpu_job(accelerator="tpu-v5p-slice"), r"^spec\.tpu: set `type` \(e\.g\. v5p-32\) or both"),
    (tpu_job(type="v5p-32", slices=0), r"^spec\.tpu\.slices: must be >= 1, got 0"),
    (tpu_job(type="v5p-32", chips=4), r"^spec\.tpu\.chips: unknown key \(allowed: accelerator, slices, topology, type\)"),
    ({**make_job(), "spec": {**make_job()["spec"], "tpu": {"type": "v5p-32"}}},
     r"^spec: set either `tpu` \(a TPU slice\) or `hosts` \(a CPU/GPU pool\), not both"),
    (make_job(hosts=0), r"^spec\.hosts: must be >= 1, got 0"),
    (make_job(hosts="2"), r"^spec\.hosts: expected an integer, got a string '2'"),
    (make_job(suspend="yes"), r"^spec\.suspend: expected true or false, got a string 'yes'"),
    (make_job(maxRestarts=-1), r"^spec\.maxRestarts: must be >= 0, got -1"),
    (make_job(ttlSecondsAfterFinished=-5), r"^spec\.ttlSecondsAfterFinished: must be >= 0, got -5"),
    (make_job(image=" "), r"^spec\.image: must not be empty"),
    (make_job(replicas=3), r"^spec\.replicas: unknown key \(allowed: config, hosts, image, maxRestarts, outputDir, "),
    (make_job(resources={"limits": {"gpu": "1"}}), r"^spec\.resources\.limits\.gpu: unknown key \(allowed: cpu, memory\)"),
    (with_config(trainer__batch_size=0), r"^spec\.config\.trainer\.batch_size: must be > 0, got 0"),
    (with_config(inference__mode="everywhere"),
     r"^spec\.config\.inference\.mode: must be one of host_data_parallel, global_mesh; got 'everywhere'"),
    (with_config(trainer__learning_rate=1.0), r"^spec\.config\.trainer\.learning_rate: unknown key"),
    (with_config(inference__eval_at_steps=[9]),
     r"^spec\.config\.inference\.eval_at_steps: a step is beyond the run \(trainer\.num_train_steps = 3\)"),
    (with_config(inference__stop_tokens=["\n", ""]),
     r"^spec\.config\.inference\.stop_tokens: stop strings must not be empty"),
    # Kueue
    (make_job(queueName="tpu", suspend=True), r"^spec: spec\.suspend cannot be true with spec\.queueName: Kueue owns"),
    (make_job(workloadPriorityClassName="batch"), r"^spec: spec\.workloadPriorityClassName is Kueue's: it needs spec\.queueName"),
    (make_job(queueName="TPU_Queue"), r"^spec\.queueName: must be a DNS-1123 label \(a LocalQueue name\)"),
    # Scheduling and pod knobs
    (make_job(scheduling={"nodeSelector": {"cloud.google.com/gke-tpu-topology": "2x2x4"}}),
     r"^spec\.scheduling\.nodeSelector: the TPU accelerator/topology labels come from spec\.tpu"),
    (make_job(scheduling={"nodeSelector": {"cloud.google.com/gke-spot": "true"}}),
     r"^spec\.scheduling\.nodeSelector: .*spot and reservation labels from spec\.scheduling\.spot"),
    (make_job(scheduling={"spot": True, "reservation": "res-1"}),
     r"^spec\.scheduling: set `spot` or `reservation`, not both: spot VMs do not consume reservations"),
    (make_job(scheduling={"nodeSelector": {"zone": 1}}), r"^spec\.scheduling\.nodeSelector\.zone: expected a string"),
    (make_job(scheduling={"tolerations": [{"key": "a", "operator": "Is"}]}),
     r"^spec\.scheduling\.tolerations\[0\]\.operator: must be one of Exists, Equal"),
    (make_job(scheduling={"affinity": ["node"]}), r"^spec\.scheduling\.affinity: expected a mapping"),
    (make_job(pod={"env": [{"name": "JAX_PROCESS_ID", "value": "0"}]}),
     r"^spec\.pod\.env: the operator sets SIMPO_CONFIG, .*JAX_PROCESS_ID"),
    (make_job(pod={"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
     r"^spec\.pod\.env\[0\]: set `value` or `valueFrom`, not both"),
    (make_job(pod={"env": [{"name": "1A", "value": "1"}]}), r"^spec\.pod\.env\[0\]\.name: must be letters"),
    (make_job(pod={"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}),
     r"^spec\.pod\.envFrom\[0\]: set one of secretRef or configMapRef"),
    (make_job(pod={"labels": {"simpo.dev/job": "other"}}),
     r"^spec\.pod\.labels: labels the operator, JobSet, the Job controller or Kueue set are not allowed"),
    (make_job(pod={"labels": {"kueue.x-k8s.io/queue-name": "q"}}), r"^spec\.pod\.labels: labels the operator"),
    (make_job(pod={"annotations": {"jobset.sigs.k8s.io/job-index": "3"}}),
     r"^spec\.pod\.annotations: annotations JobSet, the Job controller or Kueue set are not allowed"),
    (make_job(pod={"volumes": [{"name": "config", "emptyDir": {}}]}),
     r"^spec\.pod\.volumes\[0\]\.name: 'config' is taken \(the operator's config volume\)"),
    (make_job(pod={"volumes": [{"emptyDir": {}}]}), r"^spec\.pod\.volumes\[0\]\.name: required"),
    (make_job(pod={"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "b", "mountPath": "/b"}]}),
     r"^spec\.pod\.volumeMounts\[0\]\.name: 'b' is not one of spec\.pod\.volumes \(a\)"),
    (make_job(pod={"imagePullSecrets": [{"name": ""}]}), r"^spec\.pod\.imagePullSecrets\[0\]\.name: must not be empty"),
]


def with_changes(job, **dotted):
    """`a__b__c=value` sets job["spec"]["a"]["b"]["c"]."""
    for path, value in dotted.items():
        *parents, last = path.split("__")
        node = job["spec"]
        for key in parents:
            node = node[key]
        node[last] = value
    return job


# Accepted before the redesign and failing later in the pod (or never): each is now refused naming the field.
GAPS = [
    (with_changes(tpu_job(type="v5p-32"), config__trainer__batch_size=32,
                  config__trainer__mesh={"data": 2, "fsdp": 4}),
     r"^spec\.config\.trainer\.mesh: data x fsdp x model = \[2, 4, 1\] needs 8 devices, there are 16"),
    (with_changes(tpu_job(type="v5p-16", slices=2), config__trainer__batch_size=32,
                  config__trainer__mesh={"data": 1, "fsdp": -1}),
     r"^spec\.config\.trainer\.mesh: a job of 2 slices x 8 devices splits only `data` over the slices, so data "
     r"must be a multiple of 2; data x fsdp x model = \[1, 16, 1\] would put fsdp x model = 16 devices across "
     r"slices, over the data-center network \(at most 8 fit in one slice\)"),
    (with_changes(tpu_job(type="v5p-16", slices=2), config__trainer__batch_size=32,
                  config__trainer__mesh={"data": -1, "fsdp": 2, "model": 8}),
     r"^spec\.config\.trainer\.mesh: a job of 2 slices .* data x fsdp x model = \[1, 2, 8\] would put fsdp x "
     r"model = 16 devices across slices"),
    (with_changes(tpu_job(type="v5p-32"), config__trainer__batch_size=8),
     r"^spec\.config\.trainer\.batch_size: each of the 1 microbatches holds 8 pairs, not divisible by the 16 "
     r"data-parallel devices"),
    (with_changes(tpu_job(type="v5p-32"), config__trainer__batch_size=32, config__inference__tensor_parallel=8),
     r"^spec\.config\.inference\.tensor_parallel: 8 does not divide the 4 devices of each host"),
    (make_job(resources={"limits": {"memory": "16 GB"}}),
     r"^spec\.resources\.limits\.memory: must be a Kubernetes quantity such as 500m, 4 or 16Gi, got '16 GB'"),
    (make_job(serviceAccountName="Worker_SA"), r"^spec\.serviceAccountName: must be a DNS-1123 subdomain"),
    (make_job(outputDir="runs/x"), r"^spec\.outputDir: must be an absolute path or a URL"),
    (with_changes(make_job(), config__output_dir="out"), r"^spec\.config\.output_dir: must be an absolute path"),
    (with_changes(make_job(), config__data__train_files=[]),
     r"^spec\.config\.data\.train_files: needs at least 1 item\(s\), got 0"),
    (with_changes(make_job(), config__data__train_files=[" "]),
     r"^spec\.config\.data\.train_files: file patterns must not be empty"),
    (with_changes(make_job(), config__inference={"eval_every": 5, "synthetic_prompt_count": 4}),
     r"^spec\.config\.inference\.eval_every: never fires within the run: must be <= trainer\.num_train_steps "
     r"\(trainer\.num_train_steps = 3\)"),
    (with_changes(make_job(), config__inference__max_new_tokens=8000),
     r"^spec\.config\.inference\.max_new_tokens: max_prompt_len \+ max_new_tokens exceeds smollm2's context of "
     r"8192 tokens"),
    (with_changes(make_job(), config__tokenizer="smollm2", config__model={"architecture": {
        "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "max_position_embeddings": 256}}),
     r"^spec\.config\.inference\.max_new_tokens: max_prompt_len \+ max_new_tokens exceeds the model's context "
     r"\(inference\.max_prompt_len = 512, inference\.max_new_tokens = 8, "
     r"model\.architecture\.max_position_embeddings = 256\)"),
]


@pytest.mark.parametrize("job, message", CASES + GAPS, ids=[m.split(":")[0].strip("^\\").replace("\\", "") + f"-{i}"
                                                            for i, (_, m) in enumerate(CASES + GAPS)])
def test_rejected_with_the_field_and_the_allowed_values(job, message):
    with pytest.raises(ConfigError, match=message):
        validate_job(job)


def test_missing_pieces_are_named():
    job = make_job()
    del job["spec"]["config"]
    with pytest.raises(ConfigError, match=r"^spec\.config: required key is missing"):
        validate_job(job)
    job = make_job()
    del job["spec"]["image"]
    with pytest.raises(ConfigError, match=r"^spec\.image: required key is missing"):
        validate_job(job)
    with pytest.raises(ConfigError, match=r"^spec: expected a mapping"):
        validate_job({**make_job(), "spec": None})
    with pytest.raises(ConfigError, match=r"^apiVersion/kind: expected simpo\.dev/v1alpha1 SimpoInterleaveJob"):
        validate_job({**make_job(), "kind": "Job"})


def test_output_dir_may_come_from_the_spec_alone():
    job = make_job(outputDir="gs://bucket/x")
    del job["spec"]["config"]["output_dir"]
    assert validate_job(job).spec.config.output_dir == "gs://bucket/x"
    del job["spec"]["outputDir"]
    with pytest.raises(ConfigError, match=r"^spec\.config\.output_dir: required key is missing"):
        validate_job(job)


def test_names_too_long_for_pod_hostnames_are_rejected():
    with pytest.raises(ConfigError, match=r"^metadata\.name: at most 40 characters"):
        validate_job(make_job("x" * 41))
    assert validate_job(make_job("x" * 40)).name == "x" * 40


def test_defaults():
    job = validate_job(make_job())
    assert (job.namespace, job.hosts_per_slice, job.slices, job.shape) == ("jobs", 2, 1, None)
    assert (job.spec.maxRestarts, job.spec.serviceAccountName, job.spec.suspend) == (3, "simpo-worker", False)
    bare = make_job()
    del bare["spec"]["hosts"], bare["metadata"]["namespace"]
    assert (validate_job(bare).hosts_per_slice, validate_job(bare).namespace) == (1, "default")


def test_load_job_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("spec: [unclosed")
    with pytest.raises(ConfigError, match=f"^{path}: not valid YAML"):
        load_job(str(path))
    with pytest.raises(ConfigError, match="cannot read job"):
        load_job(str(tmp_path / "missing.yaml"))


def test_a_mesh_that_fits_the_slice_is_accepted():
    job = validate_job(with_changes(tpu_job(type="v5p-32"), config__trainer__batch_size=32,
                                    config__trainer__mesh={"data": 2, "fsdp": -1}))
    assert job.spec.config.trainer.check_devices(16) == (2, 8, 1)


def test_a_multislice_mesh_splits_data_over_the_slices():
    job = validate_job(with_changes(tpu_job(type="v5p-16", slices=2), config__trainer__batch_size=32,
                                    config__trainer__mesh={"data": 2, "fsdp": -1}))
    assert (job.slices, job.spec.config.trainer.check_devices(16, slices=2)) == (2, (2, 8, 1))
    # The default mesh (data -1) is pure data parallelism: any slice count divides it.
    assert validate_job(with_changes(tpu_job(type="v5p-16", slices=4), config__trainer__batch_size=32)).slices == 4
