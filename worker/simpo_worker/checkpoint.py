"""Sharded training checkpoints on any fsspec filesystem (local, gs://), complete or invisible.

Layout of one checkpoint:

    {directory}/step_{step:08d}/process_{i:04d}_of_{n:04d}.npz   the array shards process i owns
    {directory}/step_{step:08d}/manifest.json                    written last, by the leader

Every process writes the shards it owns (replica 0 of each of its addressable shards); a barrier; then the leader
writes the manifest (step, data position, seed, the arrays' shapes and dtypes, the shard files). A checkpoint
without a manifest is half-written and never restored. Restoring makes each array directly on its target
sharding and reads, for each shard a device needs, only the stored shards that overlap it, so the mesh may differ
between save and restore.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import fsspec
import jax
import numpy as np

from simpo_worker import distributed
from simpo_worker.errors import ConfigError, OutputError
from simpo_worker.mesh import from_regions
from simpo_worker.storage import exists, join, list_names, read_text, remove, retrying, write_atomic

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step_(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    data_position: int
    seed: int


def step_dir(directory: str, step: int) -> str:
    return join(directory, f"step_{step:08d}")


def complete_steps(directory: str) -> list[int]:
    """Steps with a complete checkpoint (manifest present), ascending."""
    steps = []
    for name in list_names(directory):
        match = STEP_DIR.fullmatch(name)
        if match and exists(join(step_dir(directory, int(match.group(1))), MANIFEST)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(directory: str) -> int | None:
    steps = complete_steps(directory)
    return steps[-1] if steps else None


class Checkpointer:
    def __init__(self, directory: str, keep: int, barrier_timeout_s: float):
        self.directory, self.keep, self.barrier_timeout_s = directory, keep, barrier_timeout_s
        self._saves = 0  # makes barrier names unique; every process counts alike

    def save(self, arrays: Any, info: CheckpointInfo) -> None:
        """Durable and complete for everyone when this returns (all processes call it)."""
        self._saves += 1
        tag = f"checkpoint-{info.step}-{self._saves}"
        target = step_dir(self.directory, info.step)
        self._barrier(f"{tag}-start")
        if exists(join(target, MANIFEST)):
            return  # this exact state is already durable
        self._barrier(f"{tag}-checked")
        if distributed.is_leader():
            remove(target, recursive=True)  # a half-written leftover of an earlier attempt, if any
        self._barrier(f"{tag}-clean")
        leaves = jax.tree.leaves(arrays)
        me, count = jax.process_index(), jax.process_count()
        shards = {}
        for number, leaf in enumerate(leaves):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    shards[_shard_key(number, shard.index, leaf.shape)] = np.asarray(shard.data)
        buffer = io.BytesIO()
        np.savez(buffer, **shards)
        write_atomic(join(target, _process_file(me, count)), buffer.getvalue(), "checkpoint shard")
        self._barrier(f"{tag}-written")
        if distributed.is_leader():
            manifest = {"step": info.step, "data_position": info.data_position, "seed": info.seed,
                        "files": [_process_file(i, count) for i in range(count)],
                        "arrays": [{"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for leaf in leaves]}
            write_atomic(join(target, MANIFEST), json.dumps(manifest, indent=1))
            self._prune()
        self._barrier(f"{tag}-committed")

    def info(self, step: int, template: Any) -> CheckpointInfo:
        """The info saved at `step`, after checking that its arrays fit `template` (arrays or ShapeDtypeStructs)."""
        return self._manifest(step, template)[0]

    def restore(self, step: int, template: Any, shardings: Any) -> tuple[Any, CheckpointInfo]:
        """The arrays (structure, shapes and dtypes of `template`: arrays or ShapeDtypeStructs) made directly on
        `shardings`, each process reading only the stored shards its devices' regions overlap; and the info saved
        at `step`."""
        info, files = self._manifest(step, template)
        target = step_dir(self.directory, step)
        leaves, treedef = jax.tree.flatten(template)
        store = _ShardStore([join(target, name) for name in files])
        try:
            restored = [from_regions(leaf.shape, leaf.dtype, sharding, lambda index, n=n, leaf=leaf:
                                     store.read(n, index, leaf.shape, leaf.dtype))
                        for n, (leaf, sharding) in enumerate(zip(leaves, jax.tree.leaves(shardings)))]
        finally:
            store.close()
        return jax.tree.unflatten(treedef, restored), info

    def _manifest(self, step: int, template: Any) -> tuple[CheckpointInfo, list[str]]:
        target = step_dir(self.directory, step)
        manifest_url = join(target, MANIFEST)
        try:
            manifest = json.loads(read_text(manifest_url))
            files, specs = manifest["files"], manifest["arrays"]
            info = CheckpointInfo(step=manifest["step"], data_position=manifest["data_position"],
                                  seed=manifest["seed"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise OutputError(f"{manifest_url}: unreadable checkpoint manifest: {error!r}") from error
        leaves = jax.tree.leaves(template)
        expected = [{"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for leaf in leaves]
        if specs != expected:
            mismatch = next(i for i in range(max(len(specs), len(expected)))
                            if i >= len(specs) or i >= len(expected) or specs[i] != expected[i])
            raise ConfigError(f"{target}: the checkpoint does not fit this model and optimizer (array #{mismatch}: "
                              f"stored {specs[mismatch] if mismatch < len(specs) else 'none'}, expected "
                              f"{expected[mismatch] if mismatch < len(expected) else 'none'}); was the config "
                              f"changed for an existing output_dir?")
        return info, files

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; the manifest goes first so a partial delete is invisible."""
        for old in complete_steps(self.directory)[:-self.keep]:
            target = step_dir(self.directory, old)
            remove(join(target, MANIFEST))
            remove(target, recursive=True)

    def _barrier(self, name: str) -> None:
        distributed.barrier(name, self.barrier_timeout_s)


class _ShardStore:
    """The stored shards of one checkpoint, read lazily per array region."""

    def __init__(self, urls: list[str]):
        self.archives: dict[str, np.lib.npyio.NpzFile] = {}
        self.handles = []
        self.shards: dict[int, list[tuple[str, tuple[tuple[int, int], ...], str]]] = {}
        for url in urls:
            try:
                handle = retrying(url, "open the checkpoint shard", fsspec.open(url, "rb").open)
                self.handles.append(handle)
                archive = retrying(url, "read the checkpoint shard's index", lambda: _load_from_start(handle))
                keys = archive.files
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                raise OutputError(f"{url}: unreadable checkpoint shard file: {error!r}") from error
            self.archives[url] = archive
            for key in keys:
                number, bounds = _parse_shard_key(key)
                self.shards.setdefault(number, []).append((url, bounds, key))

    def read(self, number: int, index: tuple, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Array #number's region `index` (a tuple of slices), assembled from the stored shards overlapping it."""
        region = [s.indices(size)[:2] for s, size in zip(index, shape)]
        out = np.empty([stop - start for start, stop in region], dtype)
        covered = 0
        for url, bounds, key in self.shards.get(number, []):
            overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, bounds)]
            if any(start >= stop for start, stop in overlap):
                continue
            try:
                data = retrying(url, f"read checkpoint shard {key}", lambda: self.archives[url][key])
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                raise OutputError(f"{url}: unreadable checkpoint shard {key}: {error!r}") from error
            source = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(overlap, bounds))
            dest = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(overlap, region))
            out[dest] = data[source]
            covered += int(np.prod([b - a for a, b in overlap]))
        if covered != out.size:
            raise OutputError(f"{next(iter(self.archives))}: checkpoint shards of array #{number} cover {covered} "
                              f"of the {out.size} elements of region {region}")
        return out

    def close(self) -> None:
        for archive in self.archives.values():
            archive.close()
        for handle in self.handles:
            handle.close()


def _shard_key(number: int, index: tuple, shape: tuple[int, ...]) -> str:
    return ".".join([str(number)] + [f"{s.indices(n)[0]}-{s.indices(n)[1]}" for s, n in zip(index, shape)])


def _parse_shard_key(key: str) -> tuple[int, tuple[tuple[int, int], ...]]:
    number, *bounds = key.split(".")
    return int(number), tuple(tuple(int(v) for v in bound.split("-")) for bound in bounds)


def _process_file(index: int, count: int) -> str:
    return f"process_{index:04d}_of_{count:04d}.npz"


def _load_from_start(handle) -> np.lib.npyio.NpzFile:
    handle.seek(0)  # a failed try may have read part way
    return np.load(handle)
