"""{output_dir}/metrics.jsonl: one JSON object per train step and per inference event, written by the leader."""

from __future__ import annotations

import json
from typing import Any

from simpo_worker import storage
from simpo_worker.distributed import is_leader


class MetricsWriter:
    def __init__(self, output_dir: str):
        self.url = storage.join(output_dir, "metrics.jsonl")

    def write(self, record: dict[str, Any]) -> None:
        if is_leader():
            storage.append_line(self.url, record)

    def discard_after(self, step: int) -> None:
        """Drop records past `step`: work lost in a crash after the checkpoint being resumed from."""
        if is_leader() and storage.exists(self.url):
            kept = [row for row in storage.read_jsonl(self.url) if row.get("step", 0) <= step]
            storage.write_atomic(self.url, "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
