"""JAX/XLA compilation settings: the persistent compilation cache, on every backend.

Compiling the supernet step dominates short runs (every test, and the search after each pruning
step, pays it), on CPU and on GPU alike (on a GPU the first step also autotunes every convolution
shape). The persistent compilation cache removes the compile when the same program is compiled
again: re-runs of a test, a resumed search, the same pruning mask in a later process.

XLA flags were screened on CPU and none is switched on: the ones that shorten the compile
(optimisation level 0) slow the step down far more, and the rest (LLVM expensive passes, fusion
emitters, codegen split count, YNNPACK fusions, the oneDNN custom call for grouped convolutions)
were within noise or slower. The figures are in docs/performance.md.

`configure_cache` only enables the persistent cache. Call it before the first compilation.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

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
  return cache_dir
