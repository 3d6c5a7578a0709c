"""Compile and step time of a tiny supernet's train step per op implementation, as the tests compile.

Each variant runs in a fresh subprocess with the persistent compilation cache off and, by default,
``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` (the test suite's setting; ``--full_opt`` compiles as users'
runs do). It builds the supernet of ``experiments/tiny.py:<space>`` (C = 4, batch 4, 32 x 32
images), traces, lowers and compiles its forward + backward + SGD step, and prints tracing,
lowering and XLA seconds, then the median of a few steps. Variants:

* ``shift_vjp`` (the CPU default), ``shift``, ``scan``, ``lax``: the supernet's ``dw_impl``
  (``lax`` also makes the pools ``reduce_window`` and the dense convs XLA convolutions);
* ``dw:lax``, ``pool:lax``, ``conv:lax``: only the depthwise convs, the pools or the dense convs
  as their ``lax`` form, the rest as ``shift_vjp``; ``conv:im2col``: the dense convs as im2col
  products with plain autodiff (in ``shift_vjp`` the BayesNAS ones are ``'lax_vjp'``);
* ``noremat``: ``shift_vjp`` without ``remat``.

Usage:
  python bench/bench_impl_compile.py
  python bench/bench_impl_compile.py --space darts --variants shift_vjp,lax --full_opt

Timings are wall-clock on whatever else runs on the machine: compare the variants of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import bench_opt_level  # this folder is on sys.path when a bench script runs

VARIANTS = ("shift_vjp", "shift", "scan", "lax", "dw:lax", "pool:lax", "conv:lax", "conv:im2col",
            "noremat")


def _one(space: str, variant: str, steps: int) -> None:
  """Child process: one variant; prints ``RESULT trace lower xla step``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import layers  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import supernet as supernet_lib  # pylint: disable=g-import-not-at-top

  kw = {"dw_impl": variant if variant in ("shift_vjp", "shift", "scan", "lax") else "shift_vjp"}
  if variant == "noremat":
    kw["remat"] = False
  if ":" in variant:  # one family of ops forced to one impl
    family, impl = variant.split(":")
    names = {"dw": ("depthwise_conv",), "pool": ("max_pool", "avg_pool"), "conv": ("conv",)}
    for name in names[family]:
      real = getattr(layers, name)
      setattr(layers, name, lambda *a, _f=real, _i=impl, **k: _f(*a, **dict(k, impl=_i)))
  cells = 1 if space == "nb201" else 3
  model = supernet_lib.create_supernet(space, 4, cells, 10, **kw)
  switches = supernet_lib.init_switches(space, cells)
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  batch = {"image": jax.random.normal(kx, (4, 32, 32, 3)),
           "label": jax.random.randint(ky, (4,), 0, 10)}
  variables = supernet_lib.init_variables(model, jax.random.PRNGKey(1), batch["image"], switches)
  tx = optax.sgd(0.1, momentum=0.9)
  step = bench_opt_level.sgd_train_step(model, tx)
  inputs = (variables["params"], switches, variables["batch_stats"],
            tx.init((variables["params"], switches)), batch)
  t0 = time.perf_counter()
  traced = jax.jit(step).trace(*inputs)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t)
  print(f"RESULT {t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {statistics.median(times):.4f}",
        flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--space", default="bayesnas", choices=("bayesnas", "darts", "nb201"))
  p.add_argument("--variants", default="shift_vjp,lax,dw:lax,pool:lax,conv:lax,scan,noremat")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  p.add_argument("--full_opt", action="store_true",
                 help="compile with XLA's full optimisation (users' runs), not the tests' setting")
  p.add_argument("--one", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    _one(args.space, args.one, args.steps)
    return
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      p.error(f"unknown variant {v!r}; use some of {', '.join(VARIANTS)}")
  env = dict(os.environ, BNAS_JAX_CACHE_DIR="", JAX_COMPILATION_CACHE_DIR="")
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  if not args.full_opt:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  print(f"tiny {args.space} supernet train step, "
        f"{'full XLA optimisation' if args.full_opt else 'JAX_DISABLE_MOST_OPTIMIZATIONS=1'}; "
        "seconds")
  for v in variants:
    cmd = [sys.executable, __file__, "--space", args.space, "--one", v, "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    trace, lower, xla, step = map(float, out.split("RESULT", 1)[1].split())
    print(f"  {v:10s} trace {trace:5.1f}  lower {lower:4.1f}  xla {xla:5.1f}  step {step:.3f}",
          flush=True)


if __name__ == "__main__":
  main()
