"""Tests of the compile and phase log lines (`bnas_jax.phases`) and their use in the search.

Oracles: the log lines themselves (absl records captured with caplog): one line before each
compilation naming what is compiled, with the time of the last compilation of the same program
once there was one; none when nothing compiles; the curvature pass's per-batch progress with an
ETA that is the arithmetic of the reported times.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import config_files
from bnas_jax import curvature as curvature_lib
from bnas_jax import phases
from bnas_jax import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def times_file(tmp_path, monkeypatch):
  path = str(tmp_path / phases.TIMES_FILE)
  monkeypatch.setattr(phases, "_times_path", lambda: path)
  monkeypatch.setattr(phases, "_times_in_process", {})
  return path


def _messages(caplog) -> list[str]:
  """bnas_jax's log lines (absl), without other libraries' records."""
  return [r.getMessage() for r in caplog.records if r.name == "absl"]


def test_logged_jit_logs_before_each_compilation_and_the_last_time(times_file, caplog):
  caplog.set_level(logging.INFO)
  compiles = []

  def listener(event, seconds, **kw):
    del seconds
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kw.get("fun_name", ""))

  def unique_fn(x):  # a program no other test compiles (so no persistent-cache hit)
    return jnp.sin(x) * 1.2345678 + 7.654321

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    f = phases.LoggedJit(jax.jit(unique_fn), "toy step", detail="tiny", program="p1")
    x = jnp.ones((3,))
    np.testing.assert_allclose(f(x), unique_fn(x), rtol=1e-6)
    assert _messages(caplog)[0] == "compiling the toy step (tiny) (no earlier time known)"
    assert _messages(caplog)[1].startswith("compiled the toy step (tiny) in ")
    assert compiles.count("jit(unique_fn)") == 1  # the call ran the precompiled program
    caplog.clear()
    f(x + 1)  # same signature: nothing compiles, nothing is logged
    assert not _messages(caplog) and compiles.count("jit(unique_fn)") == 1
    f(jnp.ones((4,)))  # a new shape compiles (logged)
    assert _messages(caplog)[0] == "compiling the toy step (tiny) (no earlier time known)"
    caplog.clear()
    with jax.default_matmul_precision("highest"):  # another program: compiled and logged
      f(jnp.ones((4,)))
    assert _messages(caplog)[0] == "compiling the toy step (tiny) (no earlier time known)"
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert os.path.exists(times_file)

  # A fresh process knows the time from the file only: the same program logs "last time".
  phases._times_in_process.clear()  # pylint: disable=protected-access
  caplog.clear()
  g = phases.LoggedJit(jax.jit(unique_fn), "toy step", detail="tiny", program="p1")
  g.precompile(jax.ShapeDtypeStruct((3,), jnp.float32, sharding=x.sharding), ahead=True)
  first = _messages(caplog)[0]
  assert first.startswith("compiling the toy step (tiny) ahead (last time ")
  assert first.endswith(" s)")
  caplog.clear()
  g(x)  # compiled ahead for this signature (ShapeDtypeStruct = array): no line
  assert not _messages(caplog)
  # Another program of the same name has no earlier time.
  h = phases.LoggedJit(jax.jit(unique_fn), "toy step", detail="tiny", program="p2")
  h(x)
  assert "(no earlier time known)" in _messages(caplog)[0]


def test_pass_progress_logs_batches_and_an_eta_without_the_compilations(caplog, monkeypatch):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(phases, "_compile_seconds", [100.0])
  p = phases.PassProgress(5, "curvature pass t=1/3", every_s=0.0)
  phases._compile_seconds[0] += 28.0  # pylint: disable=protected-access  (a compilation)
  p(1, 30.0)
  p(2, 32.0)
  p(3, 34.0)
  p(5, 38.0)
  assert _messages(caplog) == [
      "curvature pass t=1/3: batch 1/5 after 30.0 s (28.0 s compiling), ETA 8 s",
      "curvature pass t=1/3: batch 2/5 after 32.0 s (28.0 s compiling), ETA 6 s",
      "curvature pass t=1/3: batch 3/5 after 34.0 s (28.0 s compiling), ETA 4 s",
      "curvature pass t=1/3: 5 batches in 38.0 s (28.0 s compiling)"]
  caplog.clear()
  quiet = phases.PassProgress(5, "x", every_s=3600.0)  # intermediate lines are rate-limited
  for m in range(1, 6):
    quiet(m, float(m))
  assert _messages(caplog) == ["x: batch 1/5 after 1.0 s, ETA 4 s", "x: 5 batches in 5.0 s"]
  caplog.clear()
  phases.PassProgress(2, "y", log=False)(1, 1.0)
  assert not _messages(caplog)


def test_accumulate_reports_progress_after_each_batch_and_the_same_mean():
  diag = lambda s, v, batch, k: jax.tree.map(lambda x: x * batch, s)
  switches = {"a": jnp.ones((2,))}
  batches = [jnp.float32(b) for b in (1.0, 2.0, 6.0)]
  calls = []
  h = curvature_lib.accumulate(diag, switches, None, iter(batches),
                               progress=lambda m, t: calls.append((m, t)))
  np.testing.assert_allclose(h["a"], [3.0, 3.0])
  assert [m for m, _ in calls] == [1, 2, 3]
  assert all(t1 <= t2 for (_, t1), (_, t2) in zip(calls, calls[1:])) and calls[0][1] >= 0
  np.testing.assert_array_equal(curvature_lib.accumulate(diag, switches, None, batches)["a"],
                                h["a"])


def test_search_logs_each_compilation_and_the_curvature_progress(tmp_path, caplog,
                                                                 cifar10_subset_dir):
  config = config_files.load(os.path.join(REPO, "experiments", "tiny.py")).get_config()
  config.data.data_dir = cifar10_subset_dir
  config.search.warmup_epochs = 0
  config.search.iterations = 1
  config.search.lr = 0.0321  # enters the step functions: a program no other test builds
  config.bayes.prune_threshold = 0.0  # no pruning: every step below is the full supernet's
  config.lock()
  caplog.set_level(logging.INFO)
  search.run(config, str(tmp_path / "a"))
  log = _messages(caplog)

  def index(prefix):
    found = [i for i, m in enumerate(log) if m.startswith(prefix)]
    assert found, (prefix, log)
    return found[0]

  for what in ("state initialisation", "train step (full supernet)",
               "curvature pass (ggn_fast) (full supernet)", "prior update (full supernet)",
               "eval step (full supernet)"):
    # Before: what, and the last time if known; after: the time it took.
    assert index(f"compiling the {what} (") < index(f"compiled the {what} in "), what
  assert (index("compiling the train step") < index("[1] search/")
          < index("compiling the curvature pass") < index("curvature pass t=1/1: batch 1/2 after")
          < index("curvature pass t=1/1: 2 batches in") < index("compiling the prior update"))
  # The first batch compiled the pass: the line says so, and the ETA leaves it out.
  first = log[index("curvature pass t=1/1: batch 1/2 after")]
  assert " s compiling), ETA " in first, first

  # A second run in this process: the step functions are compiled (no line); the state
  # initialisation compiles again and now knows how long it took the first time.
  caplog.clear()
  search.run(config, str(tmp_path / "b"))
  log = _messages(caplog)
  assert [m for m in log if m.startswith("compiling")] == [
      m for m in log if m.startswith("compiling the state initialisation (last time ")]
  assert len([m for m in log if m.startswith("compiling")]) == 1


def test_compile_time_file_keeps_the_most_recent_programs(times_file, monkeypatch):
  monkeypatch.setattr(phases, "MAX_RECORDED", 2)
  for name, seconds in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("a", 4.0)):
    phases._record_compile_time(name, seconds)  # pylint: disable=protected-access
  with open(times_file) as f:
    assert json.load(f) == {"c": 3.0, "a": 4.0}
  phases._times_in_process.clear()  # pylint: disable=protected-access
  assert phases.last_compile_time("a") == 4.0 and phases.last_compile_time("b") is None
