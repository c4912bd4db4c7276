"""Output layout: atomic files, per-host shards and the leader's coverage-checked manifest."""

import json
import os

import pytest

from simpo_worker.contract.errors import DataError, OutputError
from simpo_worker.observe.metrics import MetricsWriter
from simpo_worker.store import outputs, storage


def row(step, host, hosts, index, tokens=3, reason="stop"):
    return {"step": step, "process_index": host, "process_count": hosts, "global_prompt_index": index,
            "prompt": f"p{index}", "completion": "c", "completion_tokens": tokens, "finish_reason": reason}


def test_layout_names():
    assert outputs.host_shard_path("gs://b/run", 2, 1, 4) == "gs://b/run/inference/step_000002/host_0001_of_0004.jsonl"
    assert outputs.manifest_path("gs://b/run/", 12, ) == "gs://b/run/inference/step_000012/manifest.json"


def test_manifest_totals_equal_the_rows(tmp_path):
    out = str(tmp_path)
    outputs.write_host_shard(out, 2, 0, 2, [row(2, 0, 2, 0, 5), row(2, 0, 2, 1, 7, "length")])
    outputs.write_host_shard(out, 2, 1, 2, [row(2, 1, 2, 2, 11)])
    stats = [{"process_index": i, "generate_seconds": 2.0} for i in range(2)]
    manifest = outputs.build_manifest(out, 2, 3, 2, stats, {"generate": 2.0})
    assert manifest["completion_tokens"] == 23
    assert manifest["finish_reasons"] == {"stop": 2, "length": 1}
    assert manifest["tokens_per_second"] == pytest.approx(11.5)
    assert [f["rows"] for f in manifest["files"]] == [2, 1]
    assert outputs.read_manifest(out, 2) is None  # not complete until the leader writes it
    storage.write_atomic(outputs.manifest_path(out, 2), json.dumps(manifest))
    assert outputs.read_manifest(out, 2)["prompts"] == 3
    assert not [name for name in os.listdir(outputs.inference_dir(out, 2)) if ".tmp-" in name]


@pytest.mark.parametrize("rows,message", [
    ([row(2, 0, 2, 0), row(2, 0, 2, 0)], "duplicated [0]"),
    ([row(2, 0, 2, 0)], "missing prompt indices [1, 2]"),
])
def test_coverage_check_fails_loudly(tmp_path, rows, message):
    out = str(tmp_path)
    outputs.write_host_shard(out, 2, 0, 2, rows)
    outputs.write_host_shard(out, 2, 1, 2, [])
    with pytest.raises(DataError) as error:
        outputs.build_manifest(out, 2, 3, 2, [{"generate_seconds": 1.0}] * 2, {})
    assert message in str(error.value)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(OutputError, match="cannot write"):
        outputs.check_writable(str(blocker / "run"), 0)


def test_gcs_through_the_emulator(monkeypatch):
    """The same calls against gs:// (fake-gcs-server over HTTP, gcsfs as for real GCS)."""
    from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at

    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        out = f"gs://{BUCKET}/run"
        outputs.check_writable(out, 0)
        outputs.write_host_shard(out, 2, 0, 1, [row(2, 0, 1, 0, 4), row(2, 0, 1, 1, 6, "length")])
        manifest = outputs.build_manifest(out, 2, 2, 1, [{"generate_seconds": 1.0}], {})
        storage.write_atomic(outputs.manifest_path(out, 2), json.dumps(manifest))
        assert outputs.read_manifest(out, 2)["completion_tokens"] == 10
        writer = MetricsWriter(out)
        writer.write({"step": 1})
        writer.write({"step": 2})
        assert outputs.read_metrics(out) == [{"step": 1}, {"step": 2}]
