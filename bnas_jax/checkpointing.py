"""Checkpointing: a thin wrapper around orbax's `CheckpointManager`.

A checkpoint holds two items:

* ``state``: a pytree of arrays (network variables, switches, optimiser states, prior state, the
  rng key data), saved with `orbax.checkpoint.args.StandardSave` and restored onto the shardings of
  an abstract target (`jax.ShapeDtypeStruct` leaves, e.g. from `jax.eval_shape`), so a replicated
  state comes back replicated on the current mesh;
* ``meta``: a JSON dict (the runners store their `run_lib.RunRecord` there: the position in the
  run and its history), saved with `orbax.checkpoint.args.JsonSave`.

Orbax writes every checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (atomic); `max_to_keep` keeps the last N. Checkpoints
are numbered by a monotonic *save index* (not the optimiser step), because a run saves several
times at the same optimiser step (e.g. after an epoch and after the prior update that follows it);
the meta item says where in the run each one was taken.

Callers must only hand finite states to `save` (the search loop checks before saving), so the
latest checkpoint is always a good one. A checkpoint damaged on disk afterwards (a truncated or
deleted file) raises `CheckpointDamagedError` on restore; `Checkpointer.restore_newest` (what the
runners resume with) skips it with a one-line warning and takes the newest one that restores.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bnas_jax import errors

STATE = "state"
META = "meta"


class CheckpointDamagedError(errors.ConfigError):
  """A checkpoint whose files cannot be read back (truncated, missing or corrupt files).

  The message names the checkpoint and the first line of the underlying storage error.
  `Checkpointer.restore_newest` skips such checkpoints.
  """


class Checkpointer:
  """Atomic, keep-last-N checkpoints of ``(state pytree, meta dict)`` under one directory.

  Args:
    directory: where checkpoints live (created if missing), e.g. ``<workdir>/checkpoints``.
    max_to_keep: number of most recent checkpoints kept (older ones are deleted).
    async_save: if True, array writes to disk happen in a background thread after the (blocking)
      device-to-host copy; call `wait` (or `close`) before reading the files or exiting.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))

  def latest_index(self) -> int | None:
    """Save index of the newest complete checkpoint, or None if there is none."""
    return self._manager.latest_step()

  def all_indices(self) -> list[int]:
    """Save indices of the checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, index: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves `state` and `meta` as checkpoint number `index` (must exceed every existing index).

    Raises:
      ValueError: if `index` is not larger than the latest saved index.
    """
    latest = self.latest_index()
    if latest is not None and index <= latest:
      raise ValueError(f"checkpoint index {index} must be larger than the latest one ({latest})")
    self._manager.save(index, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}), force=True)

  def restore(self, abstract_state: Any, index: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `index` (default: the latest).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or arrays giving the
        structure, dtypes and target shardings of the state.
      index: the save index; None = latest.

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: if there is no checkpoint in the directory.
      bnas_jax.errors.ConfigError: if the stored state has another tree structure or other shapes
        than `abstract_state` (another config, or a checkpoint of an older parameter layout); the
        message names the checkpoint and the fix.
      CheckpointDamagedError: (a ConfigError) if the layout matches (or its metadata cannot be
        read) but the files cannot be read back, e.g. a truncated or missing data file.
    """
    if index is None:
      index = self.latest_index()
    if index is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    try:
      # Compared before restoring: a failed orbax restore leaves its async threads printing
      # "Event loop is closed" tracebacks at exit.
      _check_stored_shapes(os.path.join(self.directory, str(index), STATE), abstract_state)
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise errors.ConfigError(
          f"checkpoint #{index} in {self.directory} does not match the state of this config and "
          "bnas_jax version (another space or model size, or a checkpoint of an older parameter "
          "layout); resume it with the version that wrote it or start a new --workdir "
          f"({type(e).__name__}: {first})") from e
    try:
      restored = self._manager.restore(index, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises plain Exception)
      raise CheckpointDamagedError(
          f"checkpoint #{index} in {self.directory} cannot be restored ({_root_cause(e)})") from e
    return restored[STATE], dict(restored[META])

  def restore_newest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]]:
    """Restores the newest checkpoint that can be read back, skipping damaged ones.

    Each skipped checkpoint is logged as one warning line naming it. With several processes,
    a checkpoint that fails on any process is skipped on all of them.

    Args:
      abstract_state: as for `restore`.

    Returns:
      ``(index, state, meta)`` of the checkpoint restored.

    Raises:
      FileNotFoundError: if there is no checkpoint in the directory.
      bnas_jax.errors.ConfigError: a layout mismatch (as `restore`; never skipped), or no
        checkpoint can be restored: the message names the directory and the fix.
    """
    indices = self.all_indices()
    if not indices:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    for index in reversed(indices):
      try:
        state, meta = self.restore(abstract_state, index)
        failure = None
      except CheckpointDamagedError as e:
        state = meta = None
        failure = e
      if jax.process_count() > 1:  # every process resumes from the same checkpoint
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        if np.any(multihost_utils.process_allgather(np.int32(failure is not None))):
          failure = failure or CheckpointDamagedError(
              f"checkpoint #{index} in {self.directory} cannot be restored on another process")
      if failure is None:
        return index, state, meta
      logging.warning("%s; skipped, trying an older checkpoint", failure)
    raise errors.ConfigError(
        f"no checkpoint in {self.directory} can be restored (checkpoints "
        f"{', '.join(f'#{i}' for i in indices)} are damaged: truncated, missing or corrupt "
        f"files); start a new --workdir, or move {self.directory} away to start this run over "
        "in the same workdir")

  def restore_meta(self, index: int | None = None) -> dict[str, Any] | None:
    """Only the meta dict of checkpoint `index` (default latest); None if there is no checkpoint."""
    if index is None:
      index = self.latest_index()
    if index is None:
      return None
    restored = self._manager.restore(index, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))
    return dict(restored[META])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def stored_tree(state_dir: str) -> Any:
  """The stored state's tree of orbax array metadata (shapes, dtypes); no array is read.

  Reads the item folder directly (``<checkpoint>/<index>/state``), which needs no step metadata.

  Raises:
    whatever orbax raises for a missing or unreadable folder.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(state_dir))
  finally:
    handler.close()
  return getattr(meta, "tree", meta)


def _check_stored_shapes(state_dir: str, abstract_state: Any) -> None:
  """Raises ValueError naming the first leaf whose stored shape or presence differs.

  Reads only orbax's metadata of the stored tree; if that cannot be read, returns and leaves the
  check to the restore itself.
  """
  try:
    tree = stored_tree(state_dir)
  except Exception:  # pylint: disable=broad-except
    return
  if tree is None:
    return

  def path_str(path) -> str:  # orbax stores named tuples as dicts or lists: compare names only
    parts = []
    for k in path:
      for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
          parts.append(str(getattr(k, attr)))
          break
    return "/".join(parts)

  stored = {path_str(p): tuple(getattr(x, "shape", ()) or ())
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted = {path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  for key in sorted(set(stored) | set(wanted)):
    if key not in stored or key not in wanted:
      where = "missing from the checkpoint" if key not in stored else "not in this state"
      raise ValueError(f"state leaf {key} is {where}")
    if stored[key] != wanted[key]:
      raise ValueError(f"state leaf {key} has shape {wanted[key]}, the checkpoint {stored[key]}")


def _root_cause(e: BaseException) -> str:
  """``'Type: first line'`` of the innermost cause of `e` (TensorStore wraps its I/O errors)."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
