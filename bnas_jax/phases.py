"""What a run is doing while it prints nothing else: logged compilations and progress with an ETA.

* `LoggedJit` wraps a `jax.jit` function: before each compilation (the first call with a new
  argument signature, or an ahead-of-time `precompile`) it logs one line naming what is compiled
  and how long the same program took to compile last time, and after it one line with the time
  taken. The times are kept in ``bnas_jax_compile_times.json`` in the persistent compilation cache
  folder (``jax_compilation_cache_dir``), so "last time" spans runs; without a cache folder, only
  compilations earlier in this process are known.
* `PassProgress` is the progress callback of a loop over a known number of batches (the curvature
  pass, `bnas_jax.curvature.accumulate`): log lines with the batches done, the time so far and an
  ETA, plus an optional tqdm bar.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Callable

from absl import logging
import jax

TIMES_FILE = "bnas_jax_compile_times.json"
MAX_RECORDED = 2000  # programs whose last compile time the file keeps (the most recent ones)

_times_lock = threading.Lock()
_times_in_process: dict[str, float] = {}
_compile_seconds = [0.0]  # all LoggedJit compilations of this process so far


def compile_seconds() -> float:
  """Seconds this process has spent in `LoggedJit` compilations so far (monotonic)."""
  with _times_lock:
    return _compile_seconds[0]


def _times_path() -> str | None:
  folder = jax.config.values.get("jax_compilation_cache_dir")
  return os.path.join(folder, TIMES_FILE) if folder else None


def last_compile_time(program: str) -> float | None:
  """Seconds the last compilation of `program` (a `LoggedJit` program id) took, if known."""
  with _times_lock:
    if program in _times_in_process:
      return _times_in_process[program]
    path = _times_path()
    if path is None or not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        value = json.load(f).get(program)
    except (OSError, ValueError, AttributeError):
      return None
    return float(value) if isinstance(value, (int, float)) else None


def _record_compile_time(program: str, seconds: float) -> None:
  with _times_lock:
    _times_in_process[program] = seconds
    _compile_seconds[0] += seconds
    path = _times_path()
    if path is None or jax.process_index() != 0:
      return
    try:
      times = {}
      if os.path.exists(path):
        with open(path) as f:
          times = json.load(f)
        if not isinstance(times, dict):
          times = {}
      times.pop(program, None)
      times[program] = round(seconds, 3)  # newest last; the oldest are dropped beyond the cap
      for old in list(times)[:max(len(times) - MAX_RECORDED, 0)]:
        del times[old]
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(times, f, indent=0)
      os.replace(tmp, path)
    except (OSError, ValueError) as e:  # the times are a convenience: never fail the run
      logging.warning("could not record the compile time in %s: %s", path, e)


def _leaf_signature(x: Any) -> Any:
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    weak = x.aval.weak_type if isinstance(x, jax.Array) else x.weak_type
    return (tuple(x.shape), str(x.dtype), bool(weak), getattr(x, "sharding", None))
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy arrays and scalars
    return (tuple(x.shape), str(x.dtype))
  return type(x).__name__


# JAX settings that change the compiled program (a change recompiles every function).
_PROGRAM_SETTINGS = ("jax_enable_x64", "jax_disable_most_optimizations", "jax_default_matmul_precision")


def signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
  """What jit compiles for: the tree structure and each leaf's shape, dtype, weak type and
  sharding (arrays and `jax.ShapeDtypeStruct` give the same signature; Python scalars by type),
  and the JAX settings that change the program (x64, most optimizations off, matmul precision)."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  settings = tuple(jax.config.values.get(k) for k in _PROGRAM_SETTINGS)
  return (treedef, tuple(_leaf_signature(x) for x in leaves), settings)


class LoggedJit:
  """A `jax.jit` function whose compilations are logged (call it like the function).

  Args:
    fn: the jitted function (has ``.lower``).
    what: what it computes, for the log line ("train step", "curvature pass (ggn_fast)").
    detail: what distinguishes this program from others of the same name ("full supernet").
    program: a stable id of the program for the compile-time record (e.g. a hash of the config
      that builds it); the argument signature is added to it.

  Attributes of the wrapped function (``lower``, ``_cache_size``, ...) are passed through.
  """

  def __init__(self, fn: Callable[..., Any], what: str, detail: str = "", program: str = ""):
    self._fn = fn
    self.what = what
    self.detail = detail
    self.program = program
    self._compiled: set[Any] = set()
    self._lock = threading.Lock()

  def __getattr__(self, name: str) -> Any:
    return getattr(self._fn, name)

  def __call__(self, *args):
    if signature(args) not in self._compiled:
      self.precompile(*args)
    return self._fn(*args)

  def precompile(self, *args, ahead: bool = False) -> None:
    """Compiles for `args` (arrays or `jax.ShapeDtypeStruct`) unless that is done, with the log
    lines; the next call with arrays of this signature runs at once."""
    sig = signature(args)
    with self._lock:
      if sig in self._compiled:
        return
      program = hashlib.sha256(f"{self.what}|{self.program}|{sig!r}".encode()).hexdigest()[:24]
      last = last_compile_time(program)
      name = f"{self.what} ({self.detail})" if self.detail else self.what
      logging.info("compiling the %s%s (%s)", name, " ahead" if ahead else "",
                   f"last time {last:.1f} s" if last is not None else "no earlier time known")
      t0 = time.perf_counter()
      self._fn.lower(*args).compile()
      seconds = time.perf_counter() - t0
      logging.info("compiled the %s in %.1f s", name, seconds)
      _record_compile_time(program, seconds)
      self._compiled.add(sig)


class PassProgress:
  """Progress of a pass over `total` batches: ``progress(done, elapsed_s)`` after each batch.

  Logs the first and the last batch and, in between, at most one line every `every_s` seconds:
  ``<desc>: batch 3/10 after 12.0 s, ETA 28 s``, with `` (N s compiling)`` after the time when
  `LoggedJit` compilations (`compile_seconds`) ran since the pass began. The ETA is the mean time
  per batch without those compilations times the batches left. A tqdm bar
  (`bnas_jax.metrics.Progress`) is shown when `bar` is True.

  Args:
    total: number of batches.
    desc: what the pass is ("curvature pass t=1").
    log: False: no log lines (non-zero processes of a multi-host run).
    bar: show a tqdm bar.
    every_s: least seconds between two intermediate log lines.
  """

  def __init__(self, total: int, desc: str, *, log: bool = True, bar: bool = False,
               every_s: float = 10.0):
    self.total, self.desc, self.log, self.every_s = int(total), desc, log, float(every_s)
    self._compile_start = compile_seconds()
    self._last_log = -float("inf")
    self._bar = None
    if bar:
      from bnas_jax import metrics  # pylint: disable=g-import-not-at-top
      self._bar = metrics.Progress(self.total, desc)

  def compiling_s(self) -> float:
    """Seconds of `LoggedJit` compilations since this pass began."""
    return compile_seconds() - self._compile_start

  def eta(self, done: int, elapsed_s: float) -> float:
    """Seconds left after `done` batches in `elapsed_s` seconds (compilations excluded)."""
    per_batch = max(elapsed_s - self.compiling_s(), 0.0) / max(done, 1)
    return max(self.total - done, 0) * per_batch

  def __call__(self, done: int, elapsed_s: float) -> None:
    if self._bar is not None:
      self._bar.update(1)
      if done >= self.total:
        self._bar.close()
    if not self.log:
      return
    now = time.monotonic()
    compiling = self.compiling_s()
    took = f"{elapsed_s:.1f} s" + (f" ({compiling:.1f} s compiling)" if compiling >= 0.05 else "")
    if done >= self.total:
      logging.info("%s: %d batches in %s", self.desc, done, took)
    elif done == 1 or now - self._last_log >= self.every_s:
      logging.info("%s: batch %d/%d after %s, ETA %.0f s", self.desc, done, self.total, took,
                   self.eta(done, elapsed_s))
    else:
      return
    self._last_log = now
