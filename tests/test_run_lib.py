"""Tests of bnas_jax.run_lib: the run record, stop signals, the stage loop and its debug hooks."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bnas_jax import errors
from bnas_jax import run_lib


def _config(**debug) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "test"
  c.width = 3
  run_lib.add_common_fields(c, checkpoint_every_steps=-1, async_save=False)
  c.progress_bar = False
  c.log_every_steps = 2
  for k, v in debug.items():
    c.debug[k] = v
  return c


def _stage(run: run_lib.Run, pos: run_lib.Position, steps: int):
  """A stage whose step adds the batch to a counter; returns (carry, pos, ended, flushes, saves)."""
  flushes, saves = [], []

  def flush(carry, p, seconds, n):
    assert seconds >= 0
    flushes.append((p.global_step, n))
    if not np.isfinite(float(carry["w"])):
      raise run.nonfinite("w", f"optimiser step {p.global_step}", "Lower the step")
    return carry

  def save(carry, p):
    saves.append(p.global_step)
    run.save(carry, run_lib.RunRecord(p, []))

  batches = iter([{"image": jnp.ones(())}] * (steps - pos.step))
  carry, pos, ended = run.train_stage({"w": jnp.zeros(())}, pos, batches,
                                      lambda c, b: {"w": c["w"] + b["image"]}, steps=steps,
                                      desc="test", flush=flush, save=save)
  return carry, pos, ended, flushes, saves


def test_position_and_record_round_trip_and_old_format_is_one_line():
  pos = run_lib.Position(stage=2, step=3, global_step=10)
  assert pos.advance() == run_lib.Position(2, 4, 11)
  assert pos.next_stage() == run_lib.Position(3, 0, 10)
  record = run_lib.RunRecord(pos, [{"epoch": 1, "acc": 0.5}])
  meta = json.loads(json.dumps(record.to_json()))
  assert meta["format"] == run_lib.RECORD_FORMAT
  assert run_lib.RunRecord.from_json(meta, "here") == record
  old = {"position": {"phase": "search", "iteration": 1, "epoch": 0, "step": 0,
                      "global_step": 3}, "history": []}
  with pytest.raises(errors.ConfigError, match=r"^checkpoint #4 in DIR was written by an older "
                     r"bnas_jax \(checkpoint format 1.* new --workdir$") as e:
    run_lib.RunRecord.from_json(old, "checkpoint #4 in DIR")
  assert "\n" not in str(e.value)


def test_stage_loop_flushes_saves_and_debug_stop_aborts_without_checkpoint(tmp_path):
  config = _config(stop_after_steps=3)
  config.checkpoint.every_steps = 2
  run = run_lib.Run(config, str(tmp_path))
  try:
    carry, pos, ended, flushes, saves = _stage(run, run_lib.Position(0, 0, 0), steps=5)
    assert ended == run_lib.ABORTED and pos == run_lib.Position(0, 3, 3)
    assert float(carry["w"]) == 3.0
    assert flushes == [(2, 2), (3, 1)] and saves == [2]
    # Resumed from the step-2 checkpoint: the stage runs to its end.
    run.config.debug.stop_after_steps = -1
    state, record = run.restore(jax.eval_shape(lambda: {"w": jnp.zeros(())}))
    assert record.position == run_lib.Position(0, 2, 2) and float(state["w"]) == 2.0
    _, pos, ended, flushes, saves = _stage(run, record.position, steps=5)
    assert ended == run_lib.FINISHED and pos == run_lib.Position(0, 5, 5)
    assert flushes == [(4, 2), (5, 1)] and saves == [4]
  finally:
    run.close()


class _Pending:
  """A carry leaf standing for a step still being computed: ready `delay` s after it is waited on."""

  def __init__(self, delay):
    self.delay = delay

  def block_until_ready(self):
    time.sleep(self.delay)
    return self


def test_step_time_covers_the_computation_not_only_the_dispatch(tmp_path):
  # Steps are dispatched asynchronously; the window's seconds must include waiting for the last
  # one (the search logged 0.3 s a step while the epoch ran at 1 s a step).
  run = run_lib.Run(_config(), str(tmp_path))
  seen = []
  try:
    run.train_stage(_Pending(0.3), run_lib.Position(), iter([None] * 2), lambda c, b: c, steps=2,
                    desc="test", flush=lambda c, p, seconds, n: seen.append(seconds) or c,
                    save=lambda c, p: None)
  finally:
    run.close()
  assert len(seen) == 1 and seen[0] >= 0.3, seen


def test_signal_at_step_checkpoints_that_step_and_restores_handlers(tmp_path):
  handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
  run = run_lib.Run(_config(signal_at_step=3), str(tmp_path))
  try:
    _, pos, ended, flushes, saves = _stage(run, run_lib.Position(1, 0, 0), steps=6)
    assert ended == run_lib.STOPPED and run.stop.name == "SIGTERM"
    assert pos.global_step == 3 and saves == [3] and flushes[-1] == (3, 1)
  finally:
    run.close()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_nan_batch_raises_the_one_nonfinite_error_naming_the_kept_checkpoint(tmp_path):
  config = _config(nan_at_step=2)
  config.checkpoint.every_steps = 1
  config.log_every_steps = 1
  run = run_lib.Run(config, str(tmp_path))
  try:
    with pytest.raises(errors.NonFiniteError, match=r"non-finite w in optimiser step 2: .*"
                       r"last good checkpoint \(#0, after optimiser step 1\) is kept .* Lower "
                       r"the step, then rerun with the same --workdir"):
      _stage(run, run_lib.Position(), steps=4)
  finally:
    run.close()
  assert run_lib.NonFiniteError is errors.NonFiniteError


def test_stop_signal_second_ctrl_c_interrupts_and_ignored_signals_stay_ignored():
  before = signal.getsignal(signal.SIGINT)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    stop = run_lib.StopSignal()
    signal.raise_signal(signal.SIGINT)  # first: a request, no exception
    assert stop.requested and stop.name == "SIGINT" and stop.agreed()
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)  # second: stop at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    # A signal ignored at start (a background job's SIGINT) gets no handler and stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = run_lib.StopSignal()
    signal.raise_signal(signal.SIGINT)
    assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    stop.restore()
  finally:
    signal.signal(signal.SIGINT, before)


def test_open_workdir_stores_the_config_and_log_and_refuses_an_unsafe_change(tmp_path):
  config = _config()
  workdir = str(tmp_path / "run")
  with run_lib.open_workdir(config, workdir, run_lib.COMMON_RESUME_SAFE_FIELDS) as w:
    assert w == workdir
    run = run_lib.Run(config, w)
    run.save({"w": jnp.zeros(())}, run_lib.RunRecord())
    run.close()
  for name in ("config.json", "config.yaml", "log.txt"):
    assert os.path.exists(os.path.join(workdir, name))
  config.debug.signal_at_step = 5  # resume-safe
  with run_lib.open_workdir(config, workdir, run_lib.COMMON_RESUME_SAFE_FIELDS):
    pass
  config.width = 4
  with pytest.raises(errors.ConfigError, match=r"width differ"):
    with run_lib.open_workdir(config, workdir, run_lib.COMMON_RESUME_SAFE_FIELDS):
      pass


def test_replicate_and_abstract_state_and_json_values():
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("data",)),
                                        jax.sharding.PartitionSpec())
  tree = {"a": np.arange(3, dtype=np.float32), "b": np.int32(2)}
  out = run_lib.replicate(tree, sharding)
  np.testing.assert_array_equal(out["a"], tree["a"])
  assert out["a"].sharding == sharding
  abstract = run_lib.abstract_state(lambda k: {"x": jnp.zeros((2, 5))}, jax.random.key(0),
                                    sharding)
  assert abstract["x"].shape == (2, 5) and abstract["x"].sharding == sharding
  assert json.dumps({"a": np.float32(0.5), "b": np.arange(2)},
                    default=run_lib.to_json_value) == '{"a": 0.5, "b": [0, 1]}'
  with pytest.raises(TypeError):
    run_lib.to_json_value(object())


def test_execute_checks_before_the_workdir_and_closes_the_run_when_the_body_raises(tmp_path):
  handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
  never = str(tmp_path / "never")

  def bad(config):
    raise errors.ConfigError(f"config.width={config.width} is bad")

  with pytest.raises(errors.ConfigError, match="config.width=3 is bad"):
    run_lib.execute(_config(), never, run_lib.COMMON_RESUME_SAFE_FIELDS, lambda c, r: None,
                    checks=(bad,))
  assert not os.path.exists(never)

  def body(config, run):
    assert run.workdir == str(tmp_path / "run") and config.width == 3
    assert signal.getsignal(signal.SIGTERM) != handlers[1]  # the run's stop handler
    raise RuntimeError("body failed")

  with pytest.raises(RuntimeError, match="body failed"):
    run_lib.execute(_config(), str(tmp_path / "run"), run_lib.COMMON_RESUME_SAFE_FIELDS, body)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
  assert os.path.exists(tmp_path / "run" / "config.json")
  assert run_lib.execute(_config(), str(tmp_path / "run"), run_lib.COMMON_RESUME_SAFE_FIELDS,
                         lambda c, r: r.is_main) is True


def test_restore_skips_a_checkpoint_whose_record_cannot_be_read(tmp_path, caplog):
  config = _config()
  run = run_lib.Run(config, str(tmp_path))
  for i in (1, 2):
    run.save({"w": jnp.full((3,), float(i))}, run_lib.RunRecord(run_lib.Position(i, 0, i)))
  run.close()
  with open(tmp_path / "checkpoints" / "1" / "meta" / "metadata", "w") as f:
    f.write("{not json")
  run = run_lib.Run(config, str(tmp_path))
  try:
    with caplog.at_level("WARNING"):
      state, record = run.restore(jax.eval_shape(lambda: {"w": jnp.zeros((3,))}))
  finally:
    run.close()
  assert record.position == run_lib.Position(1, 0, 1)
  np.testing.assert_array_equal(state["w"], np.ones(3))
  assert any("checkpoint #1" in r.getMessage() and "skipped" in r.getMessage()
             for r in caplog.records)
