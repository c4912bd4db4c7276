"""The leader's metrics records: one JSON object per train step and per inference event, each its own file
(layout and reader: simpo_worker.store.outputs)."""

from __future__ import annotations

import json
from typing import Any

from simpo_worker.parallel.distributed import is_leader
from simpo_worker.store import outputs, storage


class MetricsWriter:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self._next: int | None = None  # the next record's number, found from the stored records on first use

    def write(self, record: dict[str, Any]) -> None:
        if not is_leader():
            return
        if self._next is None:
            self._next = self._number_after(outputs.metrics_records(self.output_dir))
        url = outputs.metrics_record_path(self.output_dir, self._next, record.get("step", 0))
        storage.write_atomic(url, json.dumps(record, sort_keys=True) + "\n", "metrics record")
        self._next += 1

    def discard_after(self, step: int) -> None:
        """Drop records past `step`: work lost in a crash after the checkpoint being resumed from. Only names are
        read, and a crash part way through leaves the rest for the next start to drop."""
        if not is_leader():
            return
        kept = []
        for number, record_step, url in outputs.metrics_records(self.output_dir):
            if record_step > step:
                storage.remove(url)
            else:
                kept.append((number, record_step, url))
        self._next = self._number_after(kept)

    @staticmethod
    def _number_after(records: list[tuple[int, int, str]]) -> int:
        return records[-1][0] + 1 if records else 0
