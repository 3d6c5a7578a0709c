"""JAX/XLA compilation settings: the persistent compilation cache, on every backend.

Compiling the supernet step dominates short runs (every test, and the search after each pruning
step, pays it), on CPU and on GPU alike (on a GPU the first step also autotunes every convolution
shape). The persistent compilation cache removes the compile when the same program is compiled
again: re-runs of a test, a resumed search, the same pruning mask in a later process.

XLA flags were screened on CPU and none is switched on globally: the ones that shorten the compile
(optimisation level 0) slow the step down far more, and the rest (LLVM expensive passes, fusion
emitters, codegen split count, YNNPACK fusions, the oneDNN custom call for grouped convolutions)
were within noise or slower. One program may get its own level: with
``config.curvature.cpu_opt_level=1`` (`curvature_compiler_options`) the search's curvature pass
compiles at backend optimisation level 1 on a CPU, faster to compile and, for the default
estimator, to run (the train and eval steps run slower at level 1). It is off by default because
it changes the curvature by rounding and with it the found cells. The figures are in
docs/performance.md.

`configure_cache` enables the persistent cache and guards it against a crash of XLA:CPU: reloading
a CPU executable made of thousands of kernel objects recurses once per object on a worker thread
of fixed stack size and segfaults (the process dies; ``ulimit -s`` does not help). The pruned
supernets' train steps of the CPU proxy search reach about 3,000-4,000 objects. The guard keeps
CPU executables with more than `MAX_CPU_OBJECTS` kernel objects (ELF images in the serialized
executable) out of the cache and refuses to load such entries written before; those programs are
compiled each run. Call `configure_cache` before the first compilation.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from absl import logging
import jax

# Largest number of kernel objects of a CPU executable that is stored in / loaded from the cache.
# Executables of 2,999-3,978 objects crashed on reload, 2,654-2,660 loaded (jaxlib 0.10.2).
MAX_CPU_OBJECTS = 2_000
_ELF_MAGIC = b"\x7fELF"

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "bnas_jax", "jax_cache")


def configure_cache(cache_dir: Optional[str] = None, *, min_compile_time_s: float = 1.0) -> str:
  """Enables JAX's persistent compilation cache (idempotent).

  Args:
    cache_dir: cache directory; default ``$BNAS_JAX_CACHE_DIR`` or ``~/.cache/bnas_jax/jax_cache``.
      The directory is created if needed. An empty string disables the cache and returns ''.
    min_compile_time_s: only programs that took at least this many seconds to compile are stored
      (seconds; 1.0 keeps tiny programs out of the cache).

  Returns:
    The cache directory in use ('' when disabled).
  """
  if cache_dir is None:
    cache_dir = os.environ.get("BNAS_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
  if not cache_dir:
    return ""
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _guard_cpu_cache()
  return cache_dir


def curvature_compiler_options(level: int = 3, platform: Optional[str] = None) -> Optional[dict]:
  """XLA compiler options for the search's curvature pass (``jax.jit(..., compiler_options=)``).

  ``config.curvature.cpu_opt_level``: on a CPU, a `level` below XLA's default 3 gives
  ``{'xla_backend_optimization_level': level}``. The curvature pass runs a few times per outer
  iteration; at level 1 the `ggn_fast` pass of the CPU proxy supernet compiles in about a fifth
  less time and also runs faster (`bench/bench_opt_level.py`). Its values then differ from the
  default compile's by float32 rounding, which the search amplifies: the found cells change.

  Args:
    level: XLA backend optimisation level, 0-3 (3: XLA's default).
    platform: the backend's platform name; default `jax.default_backend()`.

  Returns:
    The options, or None (XLA's defaults) for level 3, on other platforms (not measured there),
    and when ``jax_disable_most_optimizations`` is on (level 0 then applies to every program).
  """
  platform = platform or jax.default_backend()
  if level == 3 or platform != "cpu" or jax.config.read("jax_disable_most_optimizations"):
    return None
  return {"xla_backend_optimization_level": int(level)}


def count_objects(serialized: bytes) -> int:
  """The number of ELF images (XLA:CPU kernel objects) in a serialized executable."""
  return serialized.count(_ELF_MAGIC)


def _is_cpu(backend) -> bool:
  return getattr(backend, "platform", "") == "cpu"


def _guard_cpu_cache() -> None:
  """Wraps JAX's cache read and write so that CPU executables with more than `MAX_CPU_OBJECTS`
  kernel objects are neither stored nor loaded (module docstring). Idempotent; a JAX without
  these internals is left as it is."""
  try:
    from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
    get, put = cc.get_executable_and_time, cc.put_executable_and_time
    cc.decompress_executable, cc.extract_executable_and_time, cc._get_cache  # pylint: disable=pointless-statement,protected-access
  except (ImportError, AttributeError):
    return
  if getattr(get, "_bnas_guard", False):
    return
  guarded_get, guarded_put = _guarded(cc, get, put)
  guarded_get._bnas_guard = True  # pylint: disable=protected-access
  cc.get_executable_and_time, cc.put_executable_and_time = guarded_get, guarded_put


def _guarded(cc, get, put):
  """``(get, put)`` of JAX's compilation cache (module `cc`) wrapped to skip CPU executables with
  more than `MAX_CPU_OBJECTS` kernel objects: the entry is then not loaded (``(None, None)``: a
  cache miss) or not stored."""

  @functools.wraps(get)
  def guarded_get(cache_key, compile_options, backend, *args, **kwargs):
    if not _is_cpu(backend):
      return get(cache_key, compile_options, backend, *args, **kwargs)
    cache = cc._get_cache(backend)  # pylint: disable=protected-access
    entry = None if cache is None else cache.get(cache_key)
    if entry is None:
      return None, None
    serialized, _ = cc.extract_executable_and_time(cc.decompress_executable(entry))
    n = count_objects(serialized)
    if n > MAX_CPU_OBJECTS:
      logging.info("compilation cache: not loading %s (%d kernel objects > %d; XLA:CPU crashes "
                   "reloading executables this large), compiling it instead", cache_key, n,
                   MAX_CPU_OBJECTS)
      return None, None
    return get(cache_key, compile_options, backend, *args, **kwargs)

  @functools.wraps(put)
  def guarded_put(cache_key, module_name, executable, backend, *args, **kwargs):
    if _is_cpu(backend):
      n = count_objects(executable.serialize())
      if n > MAX_CPU_OBJECTS:
        logging.info("compilation cache: not storing %s (%d kernel objects > %d; XLA:CPU crashes "
                     "reloading executables this large)", module_name, n, MAX_CPU_OBJECTS)
        return None
    return put(cache_key, module_name, executable, backend, *args, **kwargs)

  return guarded_get, guarded_put
