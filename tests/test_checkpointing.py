"""Tests of bnas_jax.checkpointing: damaged checkpoints are skipped, a layout mismatch is not."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import checkpointing
from bnas_jax import errors


def truncate_largest_data_file(checkpoint_dir: str) -> str:
  """Cuts the largest array data file of one checkpoint folder to half its size; returns it."""
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(checkpoint_dir, "state"))
           for f in names if os.sep + "d" + os.sep in os.path.join(root, f)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _state(i: int):
  return {"w": jnp.arange(1000, dtype=jnp.float32) + i, "b": jnp.full((5,), i, jnp.float32)}


def _saved(directory: str, n: int) -> checkpointing.Checkpointer:
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=n, async_save=False)
  for i in range(n):
    ckpt.save(i, _state(i), {"i": i})
  return ckpt


def test_damaged_newest_checkpoint_is_skipped_naming_it(tmp_path, caplog):
  ckpt = _saved(str(tmp_path), 3)
  truncate_largest_data_file(str(tmp_path / "2"))
  with pytest.raises(checkpointing.CheckpointDamagedError, match=r"checkpoint #2 .* cannot be "
                     r"restored \(ValueError: OUT_OF_RANGE"):
    ckpt.restore(jax.eval_shape(lambda: _state(0)), 2)
  with caplog.at_level(logging.WARNING):
    index, state, meta = ckpt.restore_newest(jax.eval_shape(lambda: _state(0)))
  assert (index, meta) == (1, {"i": 1})
  np.testing.assert_array_equal(state["w"], np.asarray(_state(1)["w"]))
  skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(skips) == 1 and f"checkpoint #2 in {tmp_path} cannot be restored" in skips[0]
  assert "\n" not in skips[0]
  ckpt.close()


def test_no_restorable_checkpoint_names_the_directory_and_the_fix(tmp_path):
  ckpt = _saved(str(tmp_path), 2)
  for i in (0, 1):
    truncate_largest_data_file(str(tmp_path / str(i)))
  with pytest.raises(errors.ConfigError) as e:
    ckpt.restore_newest(jax.eval_shape(lambda: _state(0)))
  message = str(e.value)
  assert "\n" not in message and not isinstance(e.value, checkpointing.CheckpointDamagedError)
  assert f"no checkpoint in {tmp_path} can be restored" in message and "#0, #1" in message
  assert "new --workdir" in message
  ckpt.close()


def test_layout_mismatch_is_an_error_not_a_skip(tmp_path):
  ckpt = _saved(str(tmp_path), 2)
  other = jax.eval_shape(lambda: {"w": jnp.zeros((999,)), "b": jnp.zeros((5,))})
  with pytest.raises(errors.ConfigError, match=r"#1 .* does not match the state") as e:
    ckpt.restore_newest(other)
  assert not isinstance(e.value, checkpointing.CheckpointDamagedError)
  ckpt.close()
