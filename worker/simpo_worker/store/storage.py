"""Files on any fsspec filesystem (a local path, gs://, ...): join, exists, list, remove, whole-file atomic writes,
and reads that decompress by suffix (fsspec's `compression="infer"`).

Every write is whole or not at all: local files via a temporary name and rename, object stores by a single upload
(an object appears atomically).

Transient failures (HTTP 408/429/5xx, dropped connections, timeouts) are retried, never mapped to an exit code
that ends the job. gcsfs already retries each HTTP request (6 tries, about 30 s of backoff); around every operation
here google-api-core's `Retry` adds the policy of Google's own storage client (google-cloud-storage's DEFAULT_RETRY:
exponential backoff with jitter, 1 s doubling to 60 s, for up to RETRY_TIMEOUT_S = 120 s). A failure that outlasts
it raises StorageUnavailableError, which exits retryable (the restarted job resumes from its checkpoint). Other failures are not retried: a write's (permission denied
included) is an OutputError, exit 13, naming the file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
import uuid
import zlib
from typing import Any, Callable, TypeVar

import fsspec
from google.api_core.exceptions import RetryError
from google.api_core.retry import Retry

from simpo_worker.contract.errors import DataError, OutputError

log = logging.getLogger(__name__)

RETRY_TIMEOUT_S = 120.0

# What a corrupt compressed file raises from fsspec's decompressing reader.
_DECOMPRESSION_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)

T = TypeVar("T")


class StorageUnavailableError(RuntimeError):
    """Storage kept failing transiently for RETRY_TIMEOUT_S. Retryable: a restart resumes from the checkpoint."""


def is_transient(error: BaseException) -> bool:
    """gcsfs's verdict for its own errors (408, 429, 5xx, connection and auth-refresh failures), and any
    filesystem's connection failures and timeouts. Never not-found or permission errors."""
    # Imported here, not with this module: gcsfs picks its filesystem class from the environment on first import.
    from gcsfs.retry import is_retriable

    return is_retriable(error) or isinstance(error, (ConnectionError, TimeoutError))


def retrying(url: str, what: str, operation: Callable[[], T]) -> T:
    """`operation()`, retried on transient errors with exponential backoff and jitter for up to RETRY_TIMEOUT_S."""
    def note(error: Exception) -> None:
        log.warning("%s: %s failed transiently, retrying: %s: %s", url, what, type(error).__name__, error)

    retry = Retry(predicate=is_transient, timeout=RETRY_TIMEOUT_S, on_error=note)  # backoff: Retry's defaults
    try:
        return retry(operation)()
    except RetryError as error:
        raise StorageUnavailableError(f"{url}: cannot {what}: storage still failing after {RETRY_TIMEOUT_S:.0f} s "
                                      f"of retries: {error.cause!r}") from error.cause


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)

    def check() -> bool:
        # Other hosts write here too: a cached listing (gcsfs keeps one) would hide their files.
        fs.invalidate_cache(path)
        return fs.exists(path)

    try:
        return retrying(url, "check for", check)
    except OSError as error:
        raise OutputError(f"{url}: cannot check whether it exists: {error}") from error


def list_names(url: str) -> list[str]:
    """The names of the entries directly under directory `url`, sorted; none if it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)

    def names() -> list[str]:
        fs.invalidate_cache(path)
        try:
            return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    try:
        return retrying(url, "list", names)
    except OSError as error:
        raise OutputError(f"{url}: cannot list: {error}") from error


def read_bytes(url: str, what: str = "file") -> bytes:
    """The file's bytes, decompressed by suffix (.gz, ...). Errors name the file and say what it was for."""
    def read() -> bytes:
        with fsspec.open(url, "rb", compression="infer") as handle:
            return handle.read()

    try:
        return retrying(url, f"read the {what}", read)
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


def read_many(urls: list[str], what: str = "file") -> list[bytes]:
    """The bytes of each file (all on one filesystem), fetched concurrently where the filesystem can."""
    if not urls:
        return []
    fs, _ = fsspec.core.url_to_fs(urls[0])
    paths = [fsspec.core.url_to_fs(url)[1] for url in urls]
    try:
        contents = retrying(urls[0], f"read {len(urls)} {what}s", lambda: fs.cat(paths))
    except OSError as error:
        raise DataError(f"{urls[0]} (and {len(urls) - 1} more): cannot read the {what}s: {error}") from error
    return [contents[path] for path in paths]


def read_jsonl(url: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(read_text(url).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{url}:{number}: not valid JSON: {error}") from error
    return rows


def write_atomic(url: str, data: str | bytes, what: str = "file") -> None:
    fs, path = fsspec.core.url_to_fs(url)
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def write() -> None:
        if is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, payload)

    try:
        retrying(url, f"write the {what}", write)
    except OSError as error:
        raise OutputError(f"{url}: cannot write the {what}: {error}") from error


def upload_tree(local_dir: str, url: str, what: str = "files") -> None:
    """Copy a local directory's regular files (not links) under `url` (local or any fsspec URL), keeping their
    relative paths."""
    fs, path = fsspec.core.url_to_fs(url)

    def upload() -> None:
        for root, _, names in os.walk(local_dir):
            for name in names:
                source = os.path.join(root, name)
                if os.path.islink(source) or not os.path.isfile(source):
                    continue
                target = f"{path}/{os.path.relpath(source, local_dir)}"
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                fs.put_file(source, target)

    try:
        retrying(url, f"upload the {what}", upload)
    except OSError as error:
        raise OutputError(f"{url}: cannot upload the {what}: {error}") from error


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or with `recursive`, a directory tree); one already gone is no error, so a retry after a
    partial success, or a repeat after a crash, is safe."""
    fs, path = fsspec.core.url_to_fs(url)

    def delete() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass  # already gone: what was asked for
        fs.invalidate_cache(path)

    try:
        retrying(url, "delete", delete)
    except OSError as error:
        raise OutputError(f"{url}: cannot delete: {error}") from error


def check_writable(directory: str, probe_name: str) -> None:
    """Fail before any work if `directory` cannot take a file (writes and deletes a probe)."""
    probe = join(directory, ".probe", probe_name)
    write_atomic(probe, "ok", "write probe")
    remove(probe)
