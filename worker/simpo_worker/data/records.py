"""The rows of a data file, each with where it came from, for the preference and prompt readers.

- JSONL (`.jsonl`, `.json`, `.gz` decompressed): one JSON value per non-empty line; a row is named `file:line`
  (lines counted from 1).
- Parquet (`.parquet`), e.g. UltraFeedback-binarized as published: record batches streamed through fsspec (a gs://
  file is read in ranges, never whole), only the asked-for columns; a row is a dict of those columns (nulls are
  None, message lists are lists of dicts) named `file: row N` (rows counted from 0 across the whole file).

Bad input is a DataError (exit 11) naming the file and the line or row. Storage that keeps failing transiently is
StorageUnavailableError (retryable), as everywhere else (storage.py).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from simpo_worker.contract.errors import DataError
from simpo_worker.store import storage

PARQUET_SUFFIX = ".parquet"
# Rows per streamed record batch: UltraFeedback rows are a few KiB, so a batch stays in the MiBs.
PARQUET_BATCH_ROWS = 1024


def is_parquet(url: str) -> bool:
    return url.endswith(PARQUET_SUFFIX)


def read_rows(url: str, what: str, columns: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(source, row) for every row of `url`: Parquet rows as dicts of those of `columns` the file has; JSONL lines
    as parsed JSON (all their keys)."""
    if is_parquet(url):
        yield from _parquet_rows(url, what, columns)
        return
    for number, line in enumerate(storage.read_text(url, what).splitlines(), start=1):
        if line.strip():
            source = f"{url}:{number}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{source}: not valid JSON: {error}") from error


def _parquet_rows(url: str, what: str, columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    fs, path = fsspec.core.url_to_fs(url)

    def open_file() -> tuple[Any, pq.ParquetFile]:
        handle = fs.open(path, "rb")
        try:
            return handle, pq.ParquetFile(handle)
        except BaseException:
            handle.close()
            raise

    try:
        handle, parquet = storage.retrying(url, f"open the {what}", open_file)
    except FileNotFoundError as error:
        raise DataError(f"{url}: {what} not found") from error
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{url}: not a readable Parquet file: {error}") from error
    with handle:
        present = [name for name in columns if name in parquet.schema_arrow.names]
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present):
                for values in batch.to_pylist():
                    yield f"{url}: row {row}", values
                    row += 1
        except (pa.ArrowException, OSError) as error:
            if storage.is_transient(error):
                raise storage.StorageUnavailableError(f"{url}: cannot read the {what} at row {row}: "
                                                      f"{error!r}") from error
            raise DataError(f"{url}: row {row}: unreadable Parquet data: {error}") from error
