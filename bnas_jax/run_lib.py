"""The run library shared by the runners (search, retraining, compression): a run directory, its
log and config, stop signals, debug hooks, checkpoints with one run record, and one
`NonFiniteError`.

A runner's ``run(config, workdir)`` is
``run_lib.execute(config, workdir, RESUME_SAFE_FIELDS, body, checks=(check_config, check_inputs))``:
the checks name bad input before the workdir exists, then `open_workdir` and a `Run` (writer,
checkpoints, stop signal, debug hooks) are handed to ``body(config, run)``, which reads::

  restored = run.restore(abstract_state)                        # None, or (state, RunRecord)
  ...
  state, pos, ended = run.train_stage(carry, pos, batches, ...)  # the step loop of a stage
  run.save(state, run_lib.RunRecord(pos, history))

Config fields every runner has (`add_common_fields`), each with one meaning:

* ``log_every_steps``: metrics are fetched from the device (and their finiteness checked) at
  every global step that is a multiple, and at the end of every stage;
* ``progress_bar``: a tqdm bar per stage on process 0;
* ``checkpoint.every_steps`` (> 0: also checkpoint inside a stage at every multiple of the global
  step; <= 0: only at stage ends), ``checkpoint.max_to_keep``, ``checkpoint.async_save``;
* ``debug.stop_after_steps`` (> 0: stop after that global step without a final checkpoint, a
  simulated kill), ``debug.nan_at_step`` (> 0: the k-th optimiser step, 1-based, gets a NaN batch),
  ``debug.signal_at_step`` (> 0: SIGTERM to this process after that step: the run checkpoints it
  and stops), ``debug.kill_at_step`` (> 0: SIGKILL after that step and its checkpoint, if one is
  due: a crash without any clean-up).

The run record (`RunRecord`) is what a checkpoint's meta item holds, and all it holds: the
position (stage index in the runner's plan, the next step inside that stage, the optimiser steps
taken) and the history (one JSON dict per finished stage that reports something). A checkpoint
written before this format (no ``format`` field) is refused with one line saying what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnas_jax import checkpointing
from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import metrics as metrics_lib

NonFiniteError = errors.NonFiniteError  # the one divergence error of every runner
RECORD_FORMAT = 2  # the run record's version in checkpoint meta (older checkpoints have none)

# Fields of `add_common_fields` that may change when a run resumes (`open_workdir`).
COMMON_RESUME_SAFE_FIELDS = ("log_every_steps", "progress_bar", "checkpoint.", "debug.",
                             "data.data_dir", "distributed")


def add_common_fields(c: ml_collections.ConfigDict, *, checkpoint_every_steps: int,
                      async_save: bool) -> ml_collections.ConfigDict:
  """Adds the fields every runner has (module docstring) to config `c`; returns `c`."""
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = checkpoint_every_steps  # <= 0: only at stage ends
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = async_save
  c.log_every_steps = 50
  c.progress_bar = True
  c.debug = ml_collections.ConfigDict()
  c.debug.stop_after_steps = -1  # > 0: stop after this global step, no checkpoint (simulated kill)
  c.debug.nan_at_step = -1  # > 0: the k-th optimiser step (1-based) gets a NaN batch
  c.debug.signal_at_step = -1  # > 0: SIGTERM to this process after that step (checkpoint + stop)
  c.debug.kill_at_step = -1  # > 0: SIGKILL after that step and its checkpoint, if one is due
  return c


def check_common_fields(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` naming a bad common field (`add_common_fields`)."""
  if int(config.log_every_steps) < 1:
    raise errors.ConfigError(f"config.log_every_steps={config.log_every_steps} must be >= 1")
  if int(config.checkpoint.max_to_keep) < 1:
    raise errors.ConfigError(
        f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1")
  for name in ("progress_bar",):
    if not isinstance(config[name], bool):
      raise errors.ConfigError(f"config.{name}={config[name]!r}; use True or False")


@contextlib.contextmanager
def open_workdir(config: ml_collections.ConfigDict, workdir: str,
                 resume_safe: Sequence[str]) -> Iterator[str]:
  """Creates the run directory and, on process 0, copies the log into ``log.txt`` and stores the
  config (`config_files.write_config` with `resume_safe`) while the block runs.

  Yields:
    the absolute workdir path.

  Raises:
    errors.ConfigError: the workdir holds checkpoints of a run with another config (nothing is
      written then).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  metrics_lib.quiet_library_logs()
  with (metrics_lib.LogFile(workdir) if is_main else contextlib.nullcontext()):
    if is_main:
      config_files.write_config(config, workdir, resume_safe)
    yield workdir


def execute(config: ml_collections.ConfigDict, workdir: str, resume_safe: Sequence[str],
            body: Callable[[ml_collections.ConfigDict, "Run"], Any],
            checks: Sequence[Callable[[ml_collections.ConfigDict], None]] = ()) -> Any:
  """A runner's ``run(config, workdir)``: `checks` (each raises on bad input, before anything is
  created), then `open_workdir`, a `Run` on it, ``body(config, run)``, and the run closed however
  the body ends.

  Returns:
    what `body` returns.

  Raises:
    whatever `checks` and `body` raise (the run is closed first).
  """
  for check in checks:
    check(config)
  with open_workdir(config, workdir, resume_safe) as workdir:
    run = Run(config, workdir)
    try:
      return body(config, run)
    finally:
      run.close()


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run is: the next thing to do.

  Attributes:
    stage: index into the runner's stage plan (the search's `search.plan`; the retraining's
      epoch).
    step: the next step inside that stage (0 at its start).
    global_step: optimiser steps taken so far.
  """
  stage: int = 0
  step: int = 0
  global_step: int = 0

  def advance(self) -> "Position":
    """The position after one more optimiser step of this stage."""
    return Position(self.stage, self.step + 1, self.global_step + 1)

  def next_stage(self) -> "Position":
    """The start of the next stage."""
    return Position(self.stage + 1, 0, self.global_step)


@dataclasses.dataclass
class RunRecord:
  """What a checkpoint's meta item holds: the position and the history of the run."""
  position: Position = dataclasses.field(default_factory=Position)
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "position": dataclasses.asdict(self.position),
            "history": list(self.history)}

  @classmethod
  def from_json(cls, meta: dict[str, Any], where: str) -> "RunRecord":
    """Raises `errors.ConfigError` (one line) for meta of another format, naming `where`."""
    if meta.get("format") != RECORD_FORMAT:
      raise errors.ConfigError(
          f"{where} was written by an older bnas_jax (checkpoint format "
          f"{meta.get('format', 1)}, this version reads format {RECORD_FORMAT}); resume it with "
          "the version that wrote it, or start the run again in a new --workdir")
    return cls(Position(**meta["position"]), list(meta.get("history", [])))


class StopSignal:
  """SIGINT / SIGTERM handlers that ask the run to stop at the next step boundary.

  The first signal sets `requested` (the runner then checkpoints the step it is at and returns);
  a second one restores the default action and re-delivers the signal (SIGINT raises
  KeyboardInterrupt), so a second Ctrl-C still stops at once. Handlers are only installed from the
  main thread, and not for a signal the process was started with ignored (a background job's
  SIGINT, ``nohup``): that stays ignored. `restore` puts the previous handlers back.
  """
  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = False
    self.name = ""
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # second signal: give up the graceful stop
      self.restore()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.requested, self.name = True, signal.Signals(signum).name
    logging.warning("%s received: checkpointing at the next step boundary and stopping (send it "
                    "again to stop at once)", self.name)

  def agreed(self, *, at_log_step: bool = True) -> bool:
    """Whether a signal asked the run to stop, agreed by all processes.

    One process checks after every step; several processes agree at logging steps only (one
    small all-gather of the signal numbers), so that all of them checkpoint the same step and
    stop as if they had received the signal.
    """
    if jax.process_count() == 1:
      return self.requested
    if not at_log_step:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    mine = int(getattr(signal, self.name)) if self.requested else 0
    signums = multihost_utils.process_allgather(np.asarray(mine, np.int32))
    if np.any(signums) and not self.requested:
      self.requested = True
      self.name = signal.Signals(int(np.max(signums))).name
      logging.warning("another process received %s: checkpointing this step and stopping",
                      self.name)
    return bool(np.any(signums))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


# How `Run.train_stage` ended.
FINISHED = "finished"  # every step of the stage ran
STOPPED = "stopped"  # a stop signal: the step reached is checkpointed
ABORTED = "aborted"  # debug.stop_after_steps: no final checkpoint (a simulated kill)


class Run:
  """The per-run objects every runner needs: writer, checkpoints, stop signal and debug hooks.

  Args:
    config: the run's config (with the `add_common_fields` fields).
    workdir: the run directory (``tensorboard/`` and ``checkpoints/`` go there).

  Attributes:
    is_main: whether this is process 0 (the one that writes files).
    writer: a `metrics.MetricWriter` on ``<workdir>/tensorboard``.
    checkpoints: a `checkpointing.Checkpointer` on ``<workdir>/checkpoints``.
    stop: the `StopSignal`.
    record: the `RunRecord` of the last save or restore.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"),
                                           enabled=self.is_main)
    self.checkpoints = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(config.checkpoint.max_to_keep),
        async_save=bool(config.checkpoint.async_save))
    self.stop = StopSignal()
    self.record = RunRecord()
    self._save_index = -1
    self._last_good: tuple[int, int] | None = None  # (save index, global step)

  # ---- checkpoints ------------------------------------------------------------------------------

  def restore(self, abstract_state: Any) -> tuple[Any, RunRecord] | None:
    """The state and record of the newest checkpoint that restores, or None without one.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with the target shardings.

    Raises:
      errors.ConfigError: a checkpoint of an older format or of another state layout, or none
        that restores (each names the fix).
    """
    latest = self.checkpoints.latest_index()
    if latest is None:
      return None
    try:  # the format first: an older checkpoint is refused before any array is read
      meta = self.checkpoints.restore_meta(latest)
    except Exception:  # pylint: disable=broad-except  (unreadable: restore_newest skips it)
      meta = None
    if meta is not None:
      RunRecord.from_json(meta, f"checkpoint #{latest} in {self.checkpoints.directory}")
    index, state, meta = self.checkpoints.restore_newest(abstract_state)
    self.record = RunRecord.from_json(meta, f"checkpoint #{index} in {self.checkpoints.directory}")
    self._save_index = latest  # new checkpoints go above every one on disk, damaged ones too
    self._last_good = (index, self.record.position.global_step)
    logging.info("resumed checkpoint #%d of %s at %s", index, self.workdir, self.record.position)
    return state, self.record

  def save(self, state: Any, record: RunRecord) -> None:
    """Checkpoints `state` with `record` (the caller has checked everything since the last save
    is finite)."""
    self._save_index += 1
    if self.config.checkpoint.async_save:
      state = jax.tree.map(jnp.copy, state)  # the live buffers are donated to the next step
    self.record = record
    self.checkpoints.save(self._save_index, state, record.to_json())
    self._last_good = (self._save_index, record.position.global_step)

  def nonfinite(self, what: str, where: str, fix: str) -> NonFiniteError:
    """Logs and returns (for the caller to raise) the error of a non-finite `what` at `where`,
    naming the last good checkpoint and `fix`."""
    self.checkpoints.wait()
    kept = (f"the last good checkpoint (#{self._last_good[0]}, after optimiser step "
            f"{self._last_good[1]}) is kept in {self.checkpoints.directory}"
            if self._last_good else "no checkpoint had been written yet")
    msg = (f"non-finite {what} in {where}: stopping the run; {kept}. {fix}, then rerun with the "
           "same --workdir to resume from it.")
    logging.error(msg)
    return NonFiniteError(msg)

  # ---- the step loop of a stage -----------------------------------------------------------------

  def train_stage(self, carry: Any, pos: Position, batches: Iterator[Any],
                  step_fn: Callable[[Any, Any], Any], *, steps: int, desc: str,
                  flush: Callable[[Any, Position, float, int], Any],
                  save: Callable[[Any, Position], None]) -> tuple[Any, Position, str]:
    """Runs steps ``pos.step .. steps - 1`` of one stage.

    Args:
      carry: what `step_fn` threads through the steps (e.g. the state and device-side sums).
      pos: the position of the first step to run.
      batches: the stage's batches from ``pos.step`` on.
      step_fn: ``(carry, batch) -> carry``, one optimiser step.
      steps: the number of steps of the whole stage.
      desc: the progress bar's label.
      flush: ``(carry, pos, seconds, steps) -> carry``: fetches the metrics of the steps since the
        last flush (`seconds` of wall time over `steps` steps, measured once the carry is computed:
        steps are dispatched asynchronously), raises on non-finite ones, writes them. Called at
        every ``log_every_steps``-th global step, before a checkpoint and at the stage's last step.
      save: ``(carry, pos) -> None``: checkpoints the carry's state at `pos` (mid-stage only).

    Returns:
      ``(carry, position reached, FINISHED | STOPPED | ABORTED)``.
    """
    c = self.config
    debug = c.debug
    bar = metrics_lib.Progress(steps, desc, initial=pos.step,
                               enabled=bool(c.progress_bar) and self.is_main)
    window_start, window_steps = time.perf_counter(), 0
    every_save = int(c.checkpoint.every_steps)

    def window_seconds(carry) -> float:
      # The steps run asynchronously: the window ends when its last step has been computed, not
      # when it was dispatched.
      jax.block_until_ready(carry)
      return time.perf_counter() - window_start

    try:
      for _ in range(pos.step, steps):
        batch = next(batches)
        if pos.global_step + 1 == int(debug.nan_at_step):
          batch = dict(batch, image=batch["image"] * jnp.nan)
        carry = step_fn(carry, batch)
        pos = pos.advance()
        window_steps += 1
        bar.update(1)
        log_now = pos.global_step % int(c.log_every_steps) == 0 or pos.step == steps
        save_now = every_save > 0 and pos.global_step % every_save == 0 and pos.step < steps
        abort_now = 0 < int(debug.stop_after_steps) <= pos.global_step
        if log_now or save_now or abort_now:
          carry = flush(carry, pos, window_seconds(carry), window_steps)
          window_start, window_steps = time.perf_counter(), 0
          if save_now:
            save(carry, pos)
        if abort_now:
          logging.warning("debug.stop_after_steps=%d reached: stopping without a final "
                          "checkpoint (simulated kill)", int(debug.stop_after_steps))
          return carry, pos, ABORTED
        self._debug_signals(pos.global_step)
        if pos.step < steps and self.stop.agreed(at_log_step=log_now):
          if not log_now:  # flush and check the steps since the last log
            carry = flush(carry, pos, window_seconds(carry), window_steps)
          if not save_now:  # (else this step's checkpoint was just written)
            save(carry, pos)
          return carry, pos, STOPPED
    finally:
      bar.close()
    return carry, pos, FINISHED

  def _debug_signals(self, global_step: int) -> None:
    if global_step == int(self.config.debug.signal_at_step):
      os.kill(os.getpid(), signal.SIGTERM)
    if global_step == int(self.config.debug.kill_at_step):
      self.checkpoints.wait()
      os.kill(os.getpid(), signal.SIGKILL)

  def stopped_warning(self, pos: Position) -> None:
    """Waits for pending saves and logs how a signal-stopped run resumes."""
    self.checkpoints.wait()
    if self.stop.requested:
      logging.warning("stopped by %s after optimiser step %d (stage %d); the checkpoint of that "
                      "step is in %s: rerun with the same --workdir to resume", self.stop.name,
                      pos.global_step, pos.stage, self.checkpoints.directory)

  def close(self) -> None:
    """Restores the signal handlers, waits for pending saves, closes the writer."""
    self.stop.restore()
    self.checkpoints.close()
    self.writer.close()


# --------------------------------------------------------------------------------------------------
# State on the mesh.


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host / one-device pytree -> arrays replicated with `sharding`, one distinct buffer per leaf
  (the step functions donate their inputs)."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def abstract_state(init_fn: Callable[[jax.Array], Any], key: jax.Array,
                   sharding: jax.sharding.Sharding) -> Any:
  """``init_fn(key)``'s shapes and dtypes as `jax.ShapeDtypeStruct` leaves with `sharding` (the
  restore target of a checkpoint); nothing is computed."""
  shapes = jax.eval_shape(init_fn, key)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def to_json_value(x: Any) -> Any:
  """``json.dump(default=...)`` for numpy / jax scalars and arrays.

  Raises:
    TypeError: any other type.
  """
  if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
