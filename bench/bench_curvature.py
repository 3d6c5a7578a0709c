"""Cost of the curvature estimators (bnas_jax.curvature) relative to one supernet training step.

For a search configuration (default: bayesnas, 5 cells, C = 8, batch 32, CPU) it prints, per
estimator variant: compile time, median run time per batch, that time in units of one training
step (forward + backward + SGD on weights and switches, train-mode BN), and the relative
difference of its diagonal from the exact GGN diagonal (the reference of spec 6.4) and their
Spearman rank correlation. It then prints the cost of the default estimator
(`curvature.DEFAULT_CURVATURE`) and of the paper's fast Hessian (``recursive``) over M batches as a
fraction of one search epoch of `--epoch_steps` training steps (targets: default <= 10 %,
recursive <= 1.5 training steps per batch).

As in the search runner, every estimator sees the supernet through `search_steps.curvature_apply`
(train-mode batch norm with the statistics held fixed), the training step and the reverse-mode
estimators (`curvature.REVERSE_MODE_KINDS`) use ``--dw_impl`` (default 'auto': the custom-VJP
'shift_vjp' ops on CPU) and the others the plain-AD 'shift' ops.

Usage:
  python bench/bench_curvature.py
  python bench/bench_curvature.py --variants ggn_fast,fisher --num_batches 10 --epoch_steps 1406
  python bench/bench_curvature.py --space nb201 --cells 1
  python bench/bench_curvature.py --space nb201 --cells 1 --num_batches 4 --epoch_steps 125 \
      --variants recursive,ggn_fast,ggn_reverse     # experiments/nb201_cifar10.py:cpu

Timings are wall-clock medians on whatever else runs on the machine (on the shared CI/dev box
other jobs compete for the cores): treat them as noisy, and compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnas_jax import curvature
from bnas_jax import search_steps
from bnas_jax.models import supernet as supernet_lib

# name -> (estimator, options)
VARIANTS = {
    "ggn_fast": ("ggn_fast", {}),
    "fisher": ("fisher", {"num_samples": 1}),
    "hutchinson_ggn_16": ("hutchinson", {"num_probes": 16, "matrix": "ggn"}),
    "ggn_forward": ("ggn", {"mode": "forward", "chunk_size": 32}),
    "ggn_reverse": ("ggn", {"mode": "reverse", "chunk_size": 32}),
    "hessian_hvp": ("hessian", {"method": "hvp", "chunk_size": 32}),
    "hessian_forward": ("hessian", {"method": "forward", "chunk_size": 32}),
    "recursive": ("recursive", {}),
    "recursive_fidelity": ("recursive", {"fidelity": True}),
}


def _timed(fn, *args, repeats: int):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, first, statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--space", default="bayesnas")
  p.add_argument("--channels", type=int, default=8)
  p.add_argument("--cells", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--variants", default="recursive,ggn_fast,fisher,hutchinson_ggn_16,ggn_reverse,"
                 "hessian_forward", help=f"comma list of {sorted(VARIANTS)} or 'all'")
  p.add_argument("--num_batches", type=int, default=10, help="M batches of the curvature pass")
  p.add_argument("--epoch_steps", type=int, default=45000 // 32,
                 help="training steps of one search epoch (45k examples / batch)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dw_impl", default="auto", help="depthwise/pool impl of the training step "
                 "and the reverse-mode estimators (layers.DW_IMPLS)")
  p.add_argument("--no_remat", dest="remat", action="store_false",
                 help="store the edges' activations for the backward pass (Supernet.remat=False)")
  args = p.parse_args()
  names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")

  model = supernet_lib.create_supernet(args.space, args.channels, args.cells, args.classes,
                                       remat=args.remat, dw_impl=args.dw_impl)
  plain_ad_model = model.clone(dw_impl="shift") if model.dw_impl == "shift_vjp" else model
  switches = supernet_lib.init_switches(args.space, args.cells)
  kx, ky, ki, ks = jax.random.split(jax.random.PRNGKey(0), 4)
  images = jax.random.normal(kx, (args.batch, 32, 32, 3))
  labels = jax.random.randint(ky, (args.batch,), 0, args.classes)
  batch = {"image": images, "label": labels}
  # unsafe_rbg: threefry initialisers of every supernet parameter take minutes to compile on CPU.
  ki = jax.random.key(int(jax.random.randint(ki, (), 0, 2 ** 30)), impl="unsafe_rbg")
  variables = jax.jit(lambda k: model.init(k, images, switches, train=True))(ki)
  switches = jax.tree_util.tree_map(
      lambda s: s * jax.random.uniform(ks, s.shape, minval=0.5, maxval=1.5), switches)
  n_sw = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(switches))
  print(f"devices: {jax.devices()}")
  print(f"config: {args.space} cells={args.cells} C={args.channels} batch={args.batch} "
        f"switches={n_sw} classes={args.classes} dw_impl={model.dw_impl}")

  tx = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def train_step(params, switches, batch_stats, opt_state, images, labels):
    def loss_fn(params, switches):
      logits, new = model.apply({"params": params, "batch_stats": batch_stats}, images, switches,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, switches)
    updates, opt_state = tx.update(grads, opt_state, (params, switches))
    params, switches = optax.apply_updates((params, switches), updates)
    return params, switches, stats, opt_state

  opt_state = tx.init((variables["params"], switches))
  _, compile_step, step_s = _timed(train_step, variables["params"], switches,
                                   variables["batch_stats"], opt_state, images, labels,
                                   repeats=max(args.repeats, 5))
  print(f"train step: compile+first {compile_step:.1f} s, median {step_s * 1e3:.1f} ms")

  results = {}
  ref_name = next((n for n in names if VARIANTS[n][0] == "ggn"), None)
  for name in names:
    kind, opts = VARIANTS[name]
    apply_fn = functools.partial(search_steps.curvature_apply, model if kind in
                                 curvature.REVERSE_MODE_KINDS else plain_ad_model)
    fn = curvature.make_curvature_fn(kind, apply_fn, **opts)
    h, first, run_s = _timed(fn, switches, variables, batch, jax.random.PRNGKey(1),
                             repeats=args.repeats)
    h = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(h)])
    results[name] = (h, first, run_s)
    print(f"{name:18s} compile+first {first:7.1f} s  run {run_s:8.3f} s  "
          f"= {run_s / step_s:7.1f} train steps", flush=True)
  if ref_name is not None:
    ref = results[ref_name][0]
    print(f"\nrelative L2 difference from the exact GGN diagonal ({ref_name}); "
          "Spearman rank correlation:")
    rank = lambda x: np.argsort(np.argsort(x))
    for name, (h, _, _) in results.items():
      rel = np.linalg.norm(h - ref) / np.linalg.norm(ref)
      rho = np.corrcoef(rank(h), rank(ref))[0, 1]
      print(f"  {name:18s} rel diff {rel:.3e}  spearman {rho:.4f}  min {h.min():.3e}")

  print()
  for kind, target in ((curvature.DEFAULT_CURVATURE, "10 %"), ("recursive", "2 %")):
    match = next((n for n in names if VARIANTS[n][0] == kind and not VARIANTS[n][1]), None)
    if match is None:
      continue
    run_s = results[match][2]
    frac = args.num_batches * run_s / (args.epoch_steps * step_s)
    print(f"'{kind}' over M={args.num_batches} batches: {args.num_batches * run_s:.1f} s = "
          f"{100 * frac:.2f} % of a search epoch of {args.epoch_steps} steps "
          f"({args.epoch_steps * step_s:.0f} s); target <= {target}")


if __name__ == "__main__":
  main()
