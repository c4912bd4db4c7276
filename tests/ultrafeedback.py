"""UltraFeedback-binarized's published Parquet layout (HuggingFaceH4/ultrafeedback_binarized), for test files."""

from __future__ import annotations

import hashlib

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                    ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                    ("score_rejected", pa.float64())])


def ultrafeedback_row(row: dict) -> dict:
    """A {prompt, chosen, rejected} row with message lists, completed to the published columns."""
    return {"prompt": row["prompt"], "prompt_id": hashlib.sha256(row["prompt"].encode()).hexdigest(),
            "chosen": row["chosen"], "rejected": row["rejected"], "messages": row["chosen"],
            "score_chosen": 8.0, "score_rejected": 3.5}


def write_parquet(url: str, rows: list[dict], row_group_size: int | None = None) -> str:
    """`rows` (already in the published layout) as a Parquet file at `url` (local or any fsspec URL)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with fsspec.open(url, "wb") as handle:
        pq.write_table(table, handle, row_group_size=row_group_size)
    return url
