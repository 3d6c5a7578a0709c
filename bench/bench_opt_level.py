"""Compile and run time of the search's programs at XLA:CPU backend optimisation levels.

For one supernet (default: the `cifar_proxy:cpu` shapes, bayesnas, 5 cells, C = 8, batch 18) it
compiles each program (the train step, the eval step, a curvature pass) at each level of
``xla_backend_optimization_level`` (XLA's default is 3; `bnas_jax.xla_flags` compiles the
runner's curvature pass at `xla_flags.CURVATURE_CPU_OPTIMIZATION_LEVEL`), every (program, level)
in a fresh subprocess with the persistent compilation cache off, and prints the XLA compile time
(of the lowered program: tracing and lowering excluded, they do not depend on the level) and the
median of the following runs. Rounds alternate the order of the levels.

Usage:
  python bench/bench_opt_level.py
  python bench/bench_opt_level.py --programs curvature:ggn_fast,curvature:recursive --levels 3,1
  python bench/bench_opt_level.py --space nb201 --cells 1 --batch 64 --programs curvature:ggn_fast

Timings are wall-clock on whatever else runs on the machine: compare the levels of one run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time


def sgd_train_step(model, tx):
  """``(params, switches, batch_stats, opt_state, batch) -> ((params, switches), batch_stats,
  opt_state)``: forward + backward of the mean cross-entropy and one `tx` update of weights and
  switches together (the benches' train step; the runner's adds the penalty and two optimisers)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def step(params, switches, batch_stats, opt_state, batch):
    def loss_fn(params, switches):
      logits, new = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                switches, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, switches)
    updates, opt_state = tx.update(grads, opt_state, (params, switches))
    return optax.apply_updates((params, switches), updates), stats, opt_state

  return step


def _one(args) -> None:
  """Child process: compile `args.program` at `args.level`, print one line ``compile run``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bnas_jax import curvature  # pylint: disable=g-import-not-at-top
  from bnas_jax import search_steps  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import supernet as supernet_lib  # pylint: disable=g-import-not-at-top

  # dw_impl='auto', as the runner builds it ('shift_vjp' on a CPU; the curvature below clones it
  # to 'shift' for the forward-mode kinds, as the runner does).
  model = supernet_lib.create_supernet(args.space, args.channels, args.cells, 10, dw_impl="auto")
  switches = supernet_lib.init_switches(args.space, args.cells)
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  batch_size = args.eval_batch if args.program == "eval" else args.batch
  batch = {"image": jax.random.normal(kx, (batch_size, 32, 32, 3)),
           "label": jax.random.randint(ky, (batch_size,), 0, 10)}
  # unsafe_rbg: threefry initialisers take long to compile on a CPU (as bench_curvature.py).
  variables = jax.jit(lambda k: model.init(k, batch["image"], switches, train=True))(
      jax.random.key(1, impl="unsafe_rbg"))
  if args.program == "train":
    tx = optax.sgd(0.1, momentum=0.9)
    fn = sgd_train_step(model, tx)

    inputs = (variables["params"], switches, variables["batch_stats"],
              tx.init((variables["params"], switches)), batch)
  elif args.program == "eval":
    fn = functools.partial(search_steps.eval_step, model=model, batch_bn=False)
    inputs = ({"params": variables["params"], "batch_stats": variables["batch_stats"],
               "switches": switches}, search_steps.new_eval_acc(), batch)
  else:
    kind = args.program.split(":", 1)[1]
    m = model if kind in curvature.REVERSE_MODE_KINDS else model.clone(dw_impl="shift")
    fn = curvature.make_curvature_fn(kind, functools.partial(search_steps.curvature_apply, m),
                                     jit=False)
    inputs = (switches, variables, batch, jax.random.PRNGKey(1))
  lowered = jax.jit(fn).lower(*inputs)
  options = None if args.level == 3 else {"xla_backend_optimization_level": args.level}
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options=options)
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
  print(f"RESULT {compile_s:.3f} {statistics.median(times):.4f}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--space", default="bayesnas")
  p.add_argument("--channels", type=int, default=8)
  p.add_argument("--cells", type=int, default=5)
  p.add_argument("--batch", type=int, default=18, help="train step and curvature batch")
  p.add_argument("--eval_batch", type=int, default=100)
  p.add_argument("--programs", default="train,eval,curvature:ggn_fast",
                 help="comma list of train, eval, curvature:<kind>")
  p.add_argument("--levels", default="3,1", help="comma list of xla_backend_optimization_level")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5, help="timed runs after the first")
  p.add_argument("--program", help=argparse.SUPPRESS)
  p.add_argument("--level", type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.program:
    _one(args)
    return
  levels = [int(x) for x in args.levels.split(",")]
  env = dict(os.environ, BNAS_JAX_CACHE_DIR="", JAX_COMPILATION_CACHE_DIR="")
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  print(f"{args.space}, {args.cells} cells, C = {args.channels}, batch {args.batch} "
        f"(eval {args.eval_batch}); XLA compile and median run, seconds")
  results = {}
  for r in range(args.rounds):
    for level in (levels if r % 2 == 0 else levels[::-1]):
      for program in args.programs.split(","):
        cmd = [sys.executable, __file__, "--program", program, "--level", str(level)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("space", "channels", "cells", "batch",
                                                        "eval_batch", "repeats")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        compile_s, run_s = map(float, out.split("RESULT", 1)[1].split())
        results.setdefault((program, level), []).append((compile_s, run_s))
        print(f"  round {r + 1}  {program:22s} level {level}: compile {compile_s:6.1f}  "
              f"run {run_s:.3f}", flush=True)
  print("\nmedian over rounds:")
  for (program, level), v in sorted(results.items()):
    print(f"  {program:22s} level {level}: compile {statistics.median(c for c, _ in v):6.1f}  "
          f"run {statistics.median(r for _, r in v):.3f}")


if __name__ == "__main__":
  main()
