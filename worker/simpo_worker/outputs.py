"""The output layout under `output_dir` (a local path or any fsspec URL, gs:// included):

    inference/step_{step:06d}/host_{i:04d}_of_{n:04d}.jsonl   one row per prompt, written by host i
    inference/step_{step:06d}/manifest.json                    written last, by the leader: its presence
                                                                marks the inference step complete
    metrics.jsonl                                              one object per train step / inference event
    checkpoints/                                               resumable state

Every file is written whole or not at all: local files via a temporary name and rename, object stores by a
single upload (an object appears atomically).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable

import fsspec

from simpo_worker.errors import DataError, OutputError

ROW_FIELDS = ("step", "process_index", "process_count", "global_prompt_index", "prompt", "completion",
              "completion_tokens", "finish_reason")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def inference_dir(output_dir: str, step: int) -> str:
    return join(output_dir, "inference", f"step_{step:06d}")


def host_shard_path(output_dir: str, step: int, process_index: int, process_count: int) -> str:
    return join(inference_dir(output_dir, step), f"host_{process_index:04d}_of_{process_count:04d}.jsonl")


def manifest_path(output_dir: str, step: int) -> str:
    return join(inference_dir(output_dir, step), "manifest.json")


def write_atomic(url: str, data: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if _is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data.encode("utf-8"))
    except OSError as error:
        raise OutputError(f"{url}: cannot write: {error}") from error


def append_line(url: str, record: dict[str, Any]) -> None:
    """Append one JSON line. Object stores cannot append, so the object is rewritten whole (small files only)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
        return
    existing = fs.cat_file(path).decode("utf-8") if fs.exists(path) else ""
    fs.pipe_file(path, (existing + line).encode("utf-8"))


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    # Other hosts write here too: a cached listing (gcsfs keeps one) would hide their files.
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_text(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path).decode("utf-8")


def read_jsonl(url: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(read_text(url).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{url}:{number}: not valid JSON: {error}") from error
    return rows


def check_writable(output_dir: str, process_index: int) -> None:
    """Fail before any training step if the output dir cannot take a file."""
    probe = join(output_dir, ".probe", f"host_{process_index:04d}")
    write_atomic(probe, "ok")
    fs, path = fsspec.core.url_to_fs(probe)
    try:
        fs.rm(path)
    except OSError as error:
        raise OutputError(f"{probe}: cannot delete the write probe: {error}") from error


def write_host_shard(output_dir: str, step: int, process_index: int, process_count: int,
                     rows: Iterable[dict[str, Any]]) -> str:
    url = host_shard_path(output_dir, step, process_index, process_count)
    write_atomic(url, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return url


def read_manifest(output_dir: str, step: int) -> dict[str, Any] | None:
    """The step's manifest if the inference step completed, else None."""
    url = manifest_path(output_dir, step)
    if not exists(url):
        return None
    return json.loads(read_text(url))


def build_manifest(output_dir: str, step: int, num_prompts: int, process_count: int,
                   host_stats: list[dict[str, Any]], phase_seconds: dict[str, float]) -> dict[str, Any]:
    """Read every host's shard back and check coverage: each global prompt index exactly once, rows valid."""
    files, seen, totals = [], [], {"completion_tokens": 0, "stop": 0, "length": 0}
    for host in range(process_count):
        url = host_shard_path(output_dir, step, host, process_count)
        rows = read_jsonl(url)
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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol
