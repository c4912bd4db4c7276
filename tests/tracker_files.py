"""Reading trackers' files back: TensorBoard event files with TensorBoard's own reader, W&B's .wandb run files
into W&B's own record protos."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from wandb.proto import wandb_internal_pb2

from simpo_worker.store import outputs


def tensorboard_series(logdir: str) -> EventAccumulator:
    events = EventAccumulator(logdir, size_guidance={"tensors": 0})  # 0: keep every event
    events.Reload()
    return events


def scalar_steps(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: float(tensor_util.make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)}


def shard_rows(output_dir: str, step: int, hosts: int = 1) -> list[dict]:
    """Every completion row of the pause at `step`, host by host."""
    return outputs.sample_rows(output_dir, step, hosts, per_host=10**6)


def text_tables(events: EventAccumulator, tag: str) -> dict[int, list[list[str]]]:
    """A text summary's 2-D string tensors (header row first), by step."""
    return {event.step: [[cell.decode() for cell in row] for row in tensor_util.make_ndarray(event.tensor_proto)]
            for event in events.Tensors(tag)}


def wandb_records(path: str) -> list[wandb_internal_pb2.Record]:
    """The records of a .wandb file: W&B's 7-byte header (":W&B", magic, version), then the LevelDB log format
    (32 KiB blocks of records: CRC-32 of type and data, length, type FULL/FIRST/MIDDLE/LAST, data), each record a
    wandb_internal_pb2.Record. wandb 0.31 ships no Python reader of its own (its Go service reads these)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    block, position, pending, found = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's trailer
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad record at {position}"
        position += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def wandb_history(path: str) -> dict[int, dict[str, object]]:
    """Each logged step's values (JSON-decoded; a logged object, such as a table, as the mapping W&B stores its
    fields in), by step."""
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items: dict = {}
            for item in record.history.item:
                *parents, last = [item.key] if item.key else list(item.nested_key)
                node = items
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[last] = json.loads(item.value_json)
            history[items["_step"]] = items
    return history
