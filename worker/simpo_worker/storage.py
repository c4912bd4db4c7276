"""Files on any fsspec filesystem (a local path, gs://, ...): join, exists, whole-file atomic writes, appends, and
reads that decompress by suffix (fsspec's `compression="infer"`).

Every write is whole or not at all: local files via a temporary name and rename, object stores by a single upload
(an object appears atomically).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
import zlib
from typing import Any

import fsspec

from simpo_worker.errors import DataError, OutputError

# What a corrupt compressed file raises from fsspec's decompressing reader.
_DECOMPRESSION_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    # Other hosts write here too: a cached listing (gcsfs keeps one) would hide their files.
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(url: str, what: str = "file") -> bytes:
    """The file's bytes, decompressed by suffix (.gz, ...). Errors name the file and say what it was for."""
    try:
        with fsspec.open(url, "rb", compression="infer") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise DataError(f"{url}: {what} not found") from error
    except _DECOMPRESSION_ERRORS as error:
        raise DataError(f"{url}: not a valid compressed file: {error}") from error
    except OSError as error:
        raise DataError(f"{url}: cannot read the {what}: {error}") from error


def read_text(url: str, what: str = "file") -> str:
    try:
        return read_bytes(url, what).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{url}: not UTF-8 text: {error}") from error


def read_jsonl(url: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(read_text(url).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{url}:{number}: not valid JSON: {error}") from error
    return rows


def write_atomic(url: str, data: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if is_local(fs):
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
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
        return
    existing = fs.cat_file(path).decode("utf-8") if fs.exists(path) else ""
    fs.pipe_file(path, (existing + line).encode("utf-8"))


def check_writable(directory: str, probe_name: str) -> None:
    """Fail before any work if `directory` cannot take a file (writes and deletes a probe)."""
    probe = join(directory, ".probe", probe_name)
    write_atomic(probe, "ok")
    fs, path = fsspec.core.url_to_fs(probe)
    try:
        fs.rm(path)
    except OSError as error:
        raise OutputError(f"{probe}: cannot delete the write probe: {error}") from error
