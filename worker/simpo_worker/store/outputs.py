"""The output layout under `output_dir` (a local path or any fsspec URL, gs:// included):

    inference/step_{step:06d}/host_{i:04d}_of_{n:04d}.jsonl   one row per prompt, written by host i
    inference/step_{step:06d}/manifest.json                    written last, by the leader: its presence
                                                                marks the inference step complete
    metrics/{n:08d}_step_{step:08d}.jsonl                      metrics record n (one line: a train step or an
                                                               inference event), written by the leader
    checkpoints/step_{step:08d}/                               resumable state (simpo_worker.train.checkpoint: Orbax)

Every file is written whole or not at all (simpo_worker.store.storage; checkpoints commit atomically through Orbax).

Metrics are a file per record, numbered in write order, because object stores cannot append: one growing file
would be rewritten whole, history included, on every step. Per-record files make a record one small write on any
filesystem, cannot leave a torn line for a resume to trip over, and let a resume drop the records past its
checkpoint by name alone. `read_metrics` gives them back as one ordered stream (by hand: `cat metrics/*.jsonl`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from simpo_worker.contract.errors import DataError
from simpo_worker.store import storage

ROW_FIELDS = ("step", "process_index", "process_count", "global_prompt_index", "prompt", "completion",
              "completion_tokens", "finish_reason")


def inference_dir(output_dir: str, step: int) -> str:
    return storage.join(output_dir, "inference", f"step_{step:06d}")


def host_shard_path(output_dir: str, step: int, process_index: int, process_count: int) -> str:
    return storage.join(inference_dir(output_dir, step), f"host_{process_index:04d}_of_{process_count:04d}.jsonl")


def manifest_path(output_dir: str, step: int) -> str:
    return storage.join(inference_dir(output_dir, step), "manifest.json")


def metrics_dir(output_dir: str) -> str:
    return storage.join(output_dir, "metrics")


def metrics_record_path(output_dir: str, number: int, step: int) -> str:
    return storage.join(metrics_dir(output_dir), f"{number:08d}_step_{step:08d}.jsonl")


# Anything else there (a local write's temporary file left by a crash) is not a record.
_METRICS_RECORD = re.compile(r"(\d{8})_step_(\d{8})\.jsonl")


def metrics_records(output_dir: str) -> list[tuple[int, int, str]]:
    """(number, step, url) of each stored metrics record, in write order."""
    records = []
    for name in storage.list_names(metrics_dir(output_dir)):
        match = _METRICS_RECORD.fullmatch(name)
        if match:
            records.append((int(match.group(1)), int(match.group(2)), storage.join(metrics_dir(output_dir), name)))
    return sorted(records)


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """Every metrics record, in the order written: one object per train step and per inference event."""
    urls = [url for _, _, url in metrics_records(output_dir)]
    records = []
    for url, content in zip(urls, storage.read_many(urls, "metrics record")):
        try:
            records.append(json.loads(content))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{url}: not a JSON metrics record: {error}") from error
    return records


def check_writable(output_dir: str, process_index: int) -> None:
    """Fail before any training step if the output dir cannot take a file."""
    storage.check_writable(output_dir, f"host_{process_index:04d}")


def write_host_shard(output_dir: str, step: int, process_index: int, process_count: int,
                     rows: Iterable[dict[str, Any]]) -> str:
    url = host_shard_path(output_dir, step, process_index, process_count)
    storage.write_atomic(url, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return url


def sample_rows(output_dir: str, step: int, process_count: int, per_host: int) -> list[dict[str, Any]]:
    """The first `per_host` rows of each host's shard at `step`, host by host."""
    return [row for host in range(process_count)
            for row in storage.read_jsonl(host_shard_path(output_dir, step, host, process_count))[:per_host]]


def read_manifest(output_dir: str, step: int) -> dict[str, Any] | None:
    """The step's manifest if the inference step completed, else None."""
    url = manifest_path(output_dir, step)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_text(url))


def build_manifest(output_dir: str, step: int, num_prompts: int, process_count: int,
                   host_stats: list[dict[str, Any]], phase_seconds: dict[str, float]) -> dict[str, Any]:
    """Read every host's shard back and check coverage: each global prompt index exactly once, rows valid."""
    files, seen, totals = [], [], {"completion_tokens": 0, "stop": 0, "length": 0}
    for host in range(process_count):
        url = host_shard_path(output_dir, step, host, process_count)
        rows = storage.read_jsonl(url)
        for row in rows:
            missing = [name for name in ROW_FIELDS if name not in row]
            if missing or row["step"] != step or row["process_index"] != host:
                raise DataError(f"{url}: invalid row for prompt {row.get('global_prompt_index')}: "
                                f"missing {missing}, step {row.get('step')}, host {row.get('process_index')}")
            seen.append(row["global_prompt_index"])
            totals["completion_tokens"] += row["completion_tokens"]
            totals[row["finish_reason"]] += 1
        files.append({"path": url.rsplit("/", 1)[-1], "process_index": host, "rows": len(rows)})
    duplicates = sorted({i for i in seen if seen.count(i) > 1})
    missing = sorted(set(range(num_prompts)) - set(seen))
    if duplicates or missing or len(seen) != num_prompts:
        raise DataError(f"{inference_dir(output_dir, step)}: coverage check failed: missing prompt indices "
                        f"{missing[:20]}, duplicated {duplicates[:20]}")
    generate_s = max(stats["generate_seconds"] for stats in host_stats)
    return {
        "step": step,
        "prompts": num_prompts,
        "hosts": process_count,
        "files": files,
        "coverage": {"complete": True, "unique_prompt_indices": len(set(seen))},
        "completion_tokens": totals["completion_tokens"],
        "finish_reasons": {"stop": totals["stop"], "length": totals["length"]},
        "per_host": host_stats,
        "phase_seconds": phase_seconds,
        "tokens_per_second": totals["completion_tokens"] / generate_s if generate_s > 0 else None,
    }

