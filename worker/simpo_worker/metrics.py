"""{output_dir}/metrics.jsonl: one JSON object per train step and per inference event, written by the leader."""

from __future__ import annotations

import json
from typing import Any

from simpo_worker import outputs
from simpo_worker.distributed import is_leader


class MetricsWriter:
    def __init__(self, output_dir: str):
        self.url = outputs.join(output_dir, "metrics.jsonl")

    def write(self, record: dict[str, Any]) -> None:
        if is_leader():
            outputs.append_line(self.url, record)

    def discard_after(self, step: int) -> None:
        """Drop records past `step`: work lost in a crash after the checkpoint being resumed from."""
        if is_leader() and outputs.exists(self.url):
            kept = [row for row in outputs.read_jsonl(self.url) if row.get("step", 0) <= step]
            outputs.write_atomic(self.url, "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
