"""Benchmark of the supernet training step on this machine (CPU by default).

For each chosen configuration it prints: number of weights (params incl. BN affine, excluding BN
running statistics), number of switches, compile time of the jitted step, median step time
(forward + backward + SGD update of weights and switches, train-mode BN), XLA's temporary buffer
size for the step (activation memory) and peak RSS.

Usage:
  python bench/bench_supernet.py                      # the CPU search configs
  python bench/bench_supernet.py --configs bayesnas_official --steps 3
  python bench/bench_supernet.py --configs all --dw_impl lax
  python bench/bench_supernet.py --configs darts_cpu --edge_loop unroll
  python bench/bench_supernet.py --configs darts_cpu --no_remat   # store the edges' activations

Timings are wall-clock medians on whatever else runs on the machine; treat them as noisy.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnas_jax import xla_flags
from bnas_jax.models import layers
from bnas_jax.models import supernet as supernet_lib

# name -> (space, init_channels, num_cells, batch)
CONFIGS = {
    "bayesnas_cpu": ("bayesnas", 8, 5, 32),
    "darts_cpu": ("darts", 8, 5, 32),
    "nb201_cpu": ("nb201", 8, 1, 32),
    "bayesnas_official": ("bayesnas", 36, 8, 18),
    "darts_official": ("darts", 16, 8, 64),
    "nb201_official": ("nb201", 16, 5, 64),  # experiments/nb201_cifar10.py (no variant)
}
CPU_CONFIGS = ("bayesnas_cpu", "darts_cpu", "nb201_cpu")


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def make_step(model, tx):
  """Jitted SGD step on weights and switches (mean softmax cross-entropy, train-mode BN)."""

  def loss_fn(params, switches, batch_stats, images, labels):
    logits, new_state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    switches, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_state["batch_stats"]

  @jax.jit
  def step(params, switches, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, switches, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, (params, switches))
    params, switches = optax.apply_updates((params, switches), updates)
    return params, switches, batch_stats, opt_state, loss

  return step


def run_config(name: str, steps: int, dw_impl: str, edge_loop: str = "scan",
               remat: bool = True) -> dict:
  space, c, n, b = CONFIGS[name]
  model = supernet_lib.create_supernet(space, c, n, 10, dw_impl=dw_impl, edge_loop=edge_loop,
                                       remat=remat)
  switches = supernet_lib.init_switches(space, n)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(b,)), jnp.int32)
  t0 = time.perf_counter()
  variables = supernet_lib.init_variables(model, jax.random.key(0), images, switches)
  init_s = time.perf_counter() - t0
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init((params, switches))
  step = make_step(model, tx)
  t0 = time.perf_counter()
  compiled = step.lower(params, switches, batch_stats, opt_state, images, labels).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_gb = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
  times = []
  state = (params, switches, batch_stats, opt_state)
  for _ in range(steps):
    t0 = time.perf_counter()
    out = compiled(*state, images, labels)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
    state = out[:4]
  return {
      "config": (f"{name} ({space}, C={c}, cells={n}, batch={b}, dw={model.dw_impl}, "
                 f"edges={model.edge_loop}, remat={model.remat})"),
      "temp_gb": temp_gb,
      "weights": _count(params),
      "switches": _count(switches),
      "init_s": init_s,
      "compile_s": compile_s,
      "step_median_s": statistics.median(times),
      "step_min_s": min(times),
      "loss": float(out[4]),
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="cpu",
                 help="comma list of %s, or 'cpu' (default), 'official', 'all'" % sorted(CONFIGS))
  p.add_argument("--steps", type=int, default=10, help="timed steps per config (after compile)")
  p.add_argument("--dw_impl", default="auto", choices=layers.DW_IMPLS,
                 help="depthwise implementation; 'auto' = shift_vjp on CPU, lax on GPU/TPU")
  p.add_argument("--edge_loop", default="scan", choices=supernet_lib.EDGE_LOOPS,
                 help="the cells' edge loop (Supernet.edge_loop): 'scan' compiles fastest, "
                      "'unroll' steps fastest on CPU")
  p.add_argument("--no_remat", dest="remat", action="store_false",
                 help="store the edges' activations for the backward pass (Supernet.remat=False)")
  p.add_argument("--cache_dir", default="",
                 help="persistent compilation cache (bnas_jax.xla_flags.configure_cache); default "
                      "off, so that compile times are measured cold")
  args = p.parse_args(argv)
  if args.cache_dir:
    xla_flags.configure_cache(args.cache_dir)
  names = {"cpu": list(CPU_CONFIGS),
           "official": ["bayesnas_official", "darts_official", "nb201_official"],
           "all": list(CONFIGS)}.get(args.configs, args.configs.split(","))
  for nm in names:
    if nm not in CONFIGS:
      raise SystemExit(f"unknown config {nm!r}; choose from {sorted(CONFIGS)}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s); peak RSS is per process (cumulative)")
  for nm in names:
    r = run_config(nm, args.steps, args.dw_impl, args.edge_loop, args.remat)
    print(f"{r['config']}: weights={r['weights']:,} switches={r['switches']} "
          f"init={r['init_s']:.1f}s compile={r['compile_s']:.1f}s step_median={r['step_median_s']:.3f}s "
          f"(min {r['step_min_s']:.3f}s) loss={r['loss']:.3f} xla_temp={r['temp_gb']:.2f}GB "
          f"peak_rss={r['peak_rss_gb']:.2f}GB",
          flush=True)


if __name__ == "__main__":
  main()
