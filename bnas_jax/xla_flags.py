"""JAX/XLA compilation settings (GitHub issue 3, item 6): measured on CPU, used on every backend.

Compiling the supernet step dominates short CPU runs (every test, and the search after each pruning
step, pays it). What was measured (bayesnas, 5 cells, C = 8, batch 32, forward + backward + SGD on
2 shared cores; `bench/bench_supernet.py`):

* XLA flags did not help enough to be switched on: ``--xla_backend_optimization_level=0`` cut the
  compile 144 s -> 84 s but made the step 3.6x slower (4.9 s -> 17.7 s);
  ``--xla_llvm_disable_expensive_passes``, ``--xla_cpu_use_fusion_emitters=false``,
  ``--xla_cpu_parallel_codegen_split_count=1`` and disabling the YNNPACK reduction fusions
  (``--xla_cpu_experimental_ynn_fusion_type=``) were within noise or slower (a 2-cell screen).
* ``--xla_cpu_experimental_onednn_custom_call=true`` left ``feature_group_count`` (depthwise)
  convolutions as slow as before (5 x 5 on f32[32, 32, 32, 64]: 107 ms forward, 237 ms kernel
  gradient, against 3.5 ms / 72 ms for the shift-and-multiply form).
* The persistent compilation cache removes the compile entirely when the same program is compiled
  again (re-runs of a test, a resumed search, the same pruning mask in a later process).

So `configure_cache` only enables the persistent cache. Call it before the first compilation.

On GPU compilation is just as slow: on an H200 (jax 0.11.2) the official supernet's warm-up step
took about 3 min to compile (XLA passes, then cuDNN autotuning of every convolution shape), the
search step about 1 min and the validation step about 40 s, against 61 ms per training step. The
cache is therefore enabled on every backend: a resumed GPU run skips those minutes.
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
