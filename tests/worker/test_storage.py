"""Storage failures on GCS (fake-gcs-server behind a proxy that injects GCS's error statuses, reached through gcsfs
as real GCS is): transient ones are retried and never end the job; a refused permission is exit 13 at once.
And the metrics records: one small write each, discarded past a checkpoint on resume, unbroken by a crash."""

from __future__ import annotations

import json
import logging
import time

import fsspec
import pytest

from gcs_emulator import BUCKET, fault_proxy, gcs_emulator, point_this_process_at
from simpo_worker.contract.api import ExitCode
from simpo_worker.contract.errors import NonRetryableError, OutputError
from simpo_worker.observe.metrics import MetricsWriter
from simpo_worker.store import outputs, storage

UPLOAD = f"/upload/storage/v1/b/{BUCKET}/o"


@pytest.fixture
def gcs(monkeypatch):
    """The fault proxy, with gcsfs pointed at it (a fresh filesystem instance: the port differs per test)."""
    with gcs_emulator() as env, fault_proxy(env) as (proxy, proxied):
        point_this_process_at(proxied, monkeypatch)
        fs_class = fsspec.get_filesystem_class("gs")  # imported now, with the emulator's environment
        fs_class.clear_instance_cache()
        yield proxy
        fs_class.clear_instance_cache()


def test_an_outage_longer_than_gcsfs_retries_is_retried_not_fatal(gcs, caplog):
    """gcsfs retries each request 6 times (about 30 s); an outage that outlasts them is retried around the whole
    write, so the write succeeds instead of ending the job (before: ProxyError, an OSError, became exit 13)."""
    url = f"gs://{BUCKET}/run/inference/step_000002/manifest.json"
    gcs.fail("POST", UPLOAD, [503, 429, 500, 504, 503, 502])
    with caplog.at_level(logging.WARNING, logger="simpo_worker.store.storage"):
        storage.write_atomic(url, '{"ok": true}')
    assert storage.read_text(url) == '{"ok": true}'
    uploads = gcs.requests("POST", UPLOAD)
    assert [r.status for r in uploads] == [503, 429, 500, 504, 503, 502, 200]
    assert f"{url}: write the file failed transiently, retrying: ProxyError" in caplog.text


def test_an_outage_past_the_retry_window_ends_the_attempt_retryable(gcs, monkeypatch):
    """Bounded: past RETRY_TIMEOUT_S the error is StorageUnavailableError, which the worker exits with as
    retryable (1; the restarted job resumes) and never as a non-retryable code."""
    monkeypatch.setattr(storage, "RETRY_TIMEOUT_S", 1.0)
    url = f"gs://{BUCKET}/run/metrics/00000000_step_00000001.jsonl"
    gcs.fail("POST", UPLOAD, [503] * 100)
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError, match=f"{url}: cannot write the file: storage still failing "
                                                              f"after 1 s of retries") as error:
        storage.write_atomic(url, "{}")
    assert not isinstance(error.value, (NonRetryableError, OSError))
    # One write, retried by gcsfs (6 tries), then the window was over: no second round.
    assert len(gcs.requests("POST", UPLOAD)) == 6
    assert time.monotonic() - started < 60


def test_permission_denied_is_not_retried_and_exits_13(gcs):
    url = f"gs://{BUCKET}/run/inference/step_000004/host_0000_of_0001.jsonl"
    gcs.fail("POST", UPLOAD, [403])
    with pytest.raises(OutputError, match=f"{url}: cannot write the completions: Forbidden") as error:
        storage.write_atomic(url, b"shard", "completions")
    assert error.value.exit_code == ExitCode.OUTPUT_UNUSABLE
    assert [r.status for r in gcs.requests("POST", UPLOAD)] == [403]
    # Looking for a file where neither get nor list is allowed (gcsfs falls back from one to the other) is the
    # same (before: a bare OSError, exit 1, restarted over and over).
    manifest = f"gs://{BUCKET}/run/inference/step_000002/manifest.json"
    gcs.fail("GET", "run/inference/step_000002/manifest.json", [403] * 4)
    with pytest.raises(OutputError, match=f"{manifest}: cannot check whether it exists: Forbidden") as error:
        outputs.read_manifest(f"gs://{BUCKET}/run", 2)
    assert error.value.exit_code == ExitCode.OUTPUT_UNUSABLE


def test_unusable_output_dir_at_start_exits_13(gcs):
    gcs.fail("POST", UPLOAD, [403])
    with pytest.raises(OutputError, match=rf"gs://{BUCKET}/run/.probe/host_0000: cannot write the write probe"):
        outputs.check_writable(f"gs://{BUCKET}/run", 0)


def record(step, event="train", **values):
    return {"event": event, "step": step, **values}


def test_a_metrics_record_is_one_small_write_on_object_storage(gcs):
    """Not a rewrite of the whole history: each record is one upload of its own size, nothing read back."""
    writer = MetricsWriter(f"gs://{BUCKET}/run")
    for step in range(1, 21):
        writer.write(record(step, loss=1.0 / step))
    uploads = gcs.requests("POST", UPLOAD)
    assert len(uploads) == 20
    assert max(r.body_bytes for r in uploads) < 1.2 * min(r.body_bytes for r in uploads)
    assert not [r for r in gcs.seen if r.method == "GET" and "alt=media" in r.path]  # no object content read
    assert [r["step"] for r in outputs.read_metrics(f"gs://{BUCKET}/run")] == list(range(1, 21))


def run_with_a_crash(output_dir: str) -> None:
    """An attempt that wrote steps 1-6 (and the inference event after step 2), then died; its checkpoint is 4.
    The next attempt discards past 4 and writes steps 5 and 6 anew."""
    first = MetricsWriter(output_dir)
    first.discard_after(0)
    for step in range(1, 7):
        first.write(record(step, attempt=1))
        if step == 2:
            first.write(record(2, "inference", attempt=1))
    second = MetricsWriter(output_dir)
    second.discard_after(4)
    for step in (5, 6):
        second.write(record(step, attempt=2))


EXPECTED = [(1, "train", 1), (2, "train", 1), (2, "inference", 1), (3, "train", 1), (4, "train", 1),
            (5, "train", 2), (6, "train", 2)]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_resume_discards_metrics_past_the_checkpoint(where, request, tmp_path):
    output_dir = str(tmp_path / "run") if where == "local" else f"gs://{BUCKET}/run"
    if where == "gcs":
        request.getfixturevalue("gcs")
    run_with_a_crash(output_dir)
    assert [(r["step"], r["event"], r["attempt"]) for r in outputs.read_metrics(output_dir)] == EXPECTED
    # Each record is its own file, numbered in write order.
    assert [(n, s) for n, s, _ in outputs.metrics_records(output_dir)] == [
        (0, 1), (1, 2), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]


def test_a_crash_mid_write_does_not_break_a_resume(tmp_path):
    """A local write killed part way leaves a temporary file with a torn line; the resume and every reader pass
    over it, and what is read is whole records only."""
    output_dir = str(tmp_path / "run")
    writer = MetricsWriter(output_dir)
    for step in (1, 2, 3):
        writer.write(record(step))
    torn = tmp_path / "run" / "metrics" / "00000003_step_00000004.jsonl.tmp-0123456789abcdef"
    torn.write_text(json.dumps(record(4, loss=0.5))[:17])
    resumed = MetricsWriter(output_dir)
    resumed.discard_after(3)
    resumed.write(record(4))
    assert [r["step"] for r in outputs.read_metrics(output_dir)] == [1, 2, 3, 4]


def test_a_corrupt_metrics_record_is_named(tmp_path):
    output_dir = str(tmp_path / "run")
    MetricsWriter(output_dir).write(record(1))
    (_, _, url), = outputs.metrics_records(output_dir)
    with open(url, "w") as handle:
        handle.write('{"step": 1, "lo')
    with pytest.raises(ValueError, match=f"{url}: not a JSON metrics record"):
        outputs.read_metrics(output_dir)
