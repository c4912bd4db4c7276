"""Sharded training checkpoints with Orbax (orbax-checkpoint's CheckpointManager) on local disk or gs://.

Layout of one checkpoint (Orbax's own):

    {directory}/step_{step:08d}/state/    the training state (params, optimizer state, step): an OCDBT
                                          tensorstore; every process writes the shards it owns
    {directory}/step_{step:08d}/info/     CheckpointInfo (step, data position, seed) as JSON
    {directory}/step_{step:08d}/_CHECKPOINT_METADATA   Orbax's commit record

Orbax commits atomically: a checkpoint is written under a temporary name and renamed when every process is done
(on gs://, which cannot rename, a commit_success.txt marks it), so a half-written checkpoint is never listed, let
alone restored. Saves are asynchronous: `save` returns once the arrays are copied off the devices (the next train
step may donate them) and the write goes on in the background, overlapping training or an inference pause. The
next save, `wait`, and every restore wait for it first and raise its error. Restoring reads each array straight
onto its target sharding, each process reading only the regions its devices hold, so the mesh may differ between
save and restore. Orbax's cross-process barriers go through jax.distributed's coordination service, with timeouts.
Arrays go through tensorstore, which reads TENSORSTORE_GCS_HTTP_URL (an emulator) and retries transient GCS errors
itself; the directories through etils.epath (gcsfs).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath

from simpo_worker.contract.errors import ConfigError, OutputError
from simpo_worker.parallel import distributed
from simpo_worker.store.storage import is_transient

STATE, INFO = "state", "info"
# step_00000042, as the project's other per-step outputs.
NAME_FORMAT = ocp.step.standard_name_format(step_prefix="step", step_format_fixed_length=8)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    data_position: int
    seed: int


def step_dir(directory: str, step: int) -> str:
    return f"{directory.rstrip('/')}/step_{step:08d}"


def complete_steps(directory: str) -> list[int]:
    """Steps with a committed checkpoint, ascending."""
    path = epath.Path(directory)
    _fresh_listings(path)
    if not path.exists():
        return []
    return sorted(metadata.step for metadata in NAME_FORMAT.find_all(path))


class Checkpointer:
    def __init__(self, directory: str, keep: int, barrier_timeout_s: float):
        self.directory = directory
        count = jax.process_count()
        # Orbax cannot create it itself with active_processes set (below).
        if distributed.is_leader():
            epath.Path(directory).mkdir(parents=True, exist_ok=True)
        distributed.barrier("checkpoint-directory", barrier_timeout_s)
        options = ocp.CheckpointManagerOptions(
            create=False, max_to_keep=keep, step_name_format=NAME_FORMAT, enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # an earlier attempt's half-written checkpoints
            async_options=ocp.AsyncOptions(timeout_secs=int(barrier_timeout_s)),
            # Naming every process routes Orbax's barriers through the coordination service, which times out
            # (without it they are device collectives that wait forever for a missing host).
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                active_processes=set(range(count)) if count > 1 else None))
        self._manager = ocp.CheckpointManager(
            epath.Path(directory), options=options, item_names=(STATE, INFO),
            item_handlers={STATE: ocp.StandardCheckpointHandler(), INFO: ocp.JsonCheckpointHandler()})

    def save(self, arrays: Any, info: CheckpointInfo) -> None:
        """Start saving (all processes call it): returns once the arrays are off the devices; the write goes on
        in the background. A step already saved is left as it is (this exact state is durable)."""
        self.wait()
        if info.step in self._manager.all_steps():  # the same answer on every host: no listing involved
            return
        with _storage_errors(self.directory, "save the checkpoint"):
            self._manager.save(info.step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(_by_name(arrays)),
                INFO: ocp.args.JsonSave({"step": info.step, "data_position": info.data_position,
                                         "seed": info.seed})}))

    def wait(self) -> None:
        """Until the pending save (if any) is committed everywhere; raises its error."""
        with _storage_errors(self.directory, "save the checkpoint"):
            self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest committed checkpoint (after any pending save)."""
        self.wait()
        _fresh_listings(epath.Path(self.directory))
        self._manager.reload()
        return self._manager.latest_step()

    def info(self, step: int, template: Any) -> CheckpointInfo:
        """The info saved at `step`, after checking that its arrays fit `template` (arrays or ShapeDtypeStructs)."""
        target = step_dir(self.directory, step)
        with _storage_errors(target, "read the checkpoint's metadata"):
            metadata = self._manager.item_metadata(step)
            stored = metadata[STATE]
            saved = self._manager.restore(step, args=ocp.args.Composite(**{INFO: ocp.args.JsonRestore()}))[INFO]
        expected = _by_name(template)
        if stored is None or set(stored) != set(expected):
            raise ConfigError(f"{target}: the checkpoint does not fit this model and optimizer (it holds "
                              f"{len(stored or {})} arrays, this run has {len(expected)}); was the config changed "
                              f"for an existing output_dir?")
        for name, leaf in expected.items():
            if tuple(stored[name].shape) != tuple(leaf.shape) or stored[name].dtype != leaf.dtype:
                raise ConfigError(f"{target}: the checkpoint does not fit this model and optimizer ({name}: stored "
                                  f"{stored[name].dtype}{list(stored[name].shape)}, expected "
                                  f"{leaf.dtype}{list(leaf.shape)}); was the config changed for an existing "
                                  f"output_dir?")
        try:
            return CheckpointInfo(step=saved["step"], data_position=saved["data_position"], seed=saved["seed"])
        except (KeyError, TypeError) as error:
            raise OutputError(f"{target}: unreadable checkpoint info: {error!r}") from error

    def restore(self, step: int, template: Any, shardings: Any) -> tuple[Any, CheckpointInfo]:
        """The arrays (structure, shapes and dtypes of `template`) made directly on `shardings`, each process
        reading only the regions its devices hold; and the info saved at `step`."""
        info = self.info(step, template)
        leaves, treedef = jax.tree.flatten(template)
        targets = _by_name(jax.tree.unflatten(treedef, [
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            for leaf, sharding in zip(leaves, jax.tree.leaves(shardings))]))
        with _storage_errors(step_dir(self.directory, step), "read the checkpoint"):
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(targets)}))[STATE]
        return jax.tree.unflatten(treedef, [restored[name] for name in targets]), info


def _fresh_listings(path: epath.Path) -> None:
    """Orbax lists steps through etils.epath's own gcsfs instance, whose cached listings would hide what other
    processes, and tensorstore (a GCS client of its own), wrote since: drop them (local paths keep none)."""
    if "://" in str(path):
        path._backend.fs(path).invalidate_cache()


def _by_name(tree: Any) -> dict[str, Any]:
    """The leaves by their path in the tree (model_layers_wq, opt_state_1_0_mu_model_embed, ...): Orbax's item
    is a flat dict, so restoring needs no equinox module structure."""
    named = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = re.sub(r"[^A-Za-z0-9]+", "_", jax.tree_util.keystr(path)).strip("_")
        if name in named:
            raise ValueError(f"two state arrays named {name!r}")
        named[name] = leaf
    return named


@contextlib.contextmanager
def _storage_errors(where: str, what: str) -> Iterator[None]:
    """Storage failures a restart cannot fix as OutputError (exit 13), naming the checkpoint, as
    simpo_worker.store.storage does: a refused write (gcsfs's non-transient OSError, tensorstore's PERMISSION_DENIED) or unreadable data.
    Others propagate as they are (retryable; gcsfs and tensorstore already retried the transient ones). Orbax wraps
    tensorstore's errors in a bare Exception: the cause chain says what failed."""
    try:
        yield
    except (ConfigError, OutputError):
        raise
    except Exception as error:
        chain = _chain(error)
        refused = any("PERMISSION_DENIED" in str(e) or (isinstance(e, OSError) and not is_transient(e))
                      for e in chain)
        unreadable = what.startswith("read") and any(isinstance(e, (OSError, ValueError)) for e in chain)
        if refused or unreadable:
            raise OutputError(f"{where}: {'unreadable checkpoint: ' if unreadable else ''}cannot {what}: "
                              f"{'; '.join(str(e) for e in chain)}") from error
        raise


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain
