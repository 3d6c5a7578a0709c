"""Where the supernet step's time goes, by candidate-op group (CPU search configs by default).

For one space it times the training step (the same step as ``bench_supernet.py``) of the full
supernet and of supernets that keep one op group alive on every edge (pools, skip, separable
convs, dilated convs; the alive mask removes the others from the program, as pruning does). The
"skip" row is close to the fixed cost (stem, preprocessing, head, switch bookkeeping); each other
row minus it is that group's cost.

Usage:
  python bench/bench_op_groups.py                 # darts, 5 cells, C = 8, batch 32
  python bench/bench_op_groups.py --space bayesnas --steps 4

`torch_darts_reference.py` prints the same split for PyTorch; figures and the commands that
produced them are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_supernet import make_step  # the same training step (bench/ is on sys.path)
from bnas_jax.models import supernet as supernet_lib
from bnas_jax.search_space import spaces

# Column groups of the alive mask [origin, op_0, ...] per space, by candidate-op name.
GROUPS = {
    "pools": ("max_pool_3x3", "avg_pool_3x3", "max", "avg"),
    "skip": ("skip_connect", "ident"),
    "sep": ("sep_conv_3x3", "sep_conv_5x5", "sep3", "sep5"),
    "dil": ("dil_conv_3x3", "dil_conv_5x5", "dil3", "dil5"),
}


def group_mask(space: spaces.SearchSpace, keep: tuple[str, ...] | None) -> dict[str, np.ndarray]:
  """Alive mask with every origin alive and only the ops named in `keep` (None = all)."""
  mask = spaces.full_mask(space)
  if keep is not None:
    for m in mask.values():
      for j, op in enumerate(space.ops):
        m[:, 1 + j] = op in keep
  return mask


def time_step(space_name: str, channels: int, cells: int, batch: int, mask, steps: int,
              dw_impl: str, edge_loop: str = "scan") -> tuple[float, float]:
  """(compile seconds, median step seconds) of the training step of the masked supernet."""
  model = supernet_lib.create_supernet(space_name, channels, cells, 10,
                                       alive=spaces.freeze_mask(mask), dw_impl=dw_impl,
                                       edge_loop=edge_loop)
  switches = supernet_lib.init_switches(space_name, cells)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
  v = supernet_lib.init_variables(model, jax.random.key(0), images, switches)
  tx = optax.sgd(0.01, momentum=0.9)
  state = (v["params"], switches, v["batch_stats"], tx.init((v["params"], switches)))
  t0 = time.perf_counter()
  compiled = make_step(model, tx).lower(*state, images, labels).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*state, images, labels))
    times.append(time.perf_counter() - t0)
    state = out[:4]
  return compile_s, statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--space", default="darts", choices=("darts", "bayesnas"))
  p.add_argument("--channels", type=int, default=8)
  p.add_argument("--cells", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after compile)")
  p.add_argument("--dw_impl", default="auto")
  p.add_argument("--edge_loop", default="scan", choices=supernet_lib.EDGE_LOOPS)
  args = p.parse_args(argv)
  space = spaces.get_space(args.space)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.space}, C={args.channels}, "
        f"cells={args.cells}, batch={args.batch}")
  variants = [("all", None)] + [(g, ops) for g, ops in GROUPS.items()]
  for name, keep in variants:
    compile_s, step_s = time_step(args.space, args.channels, args.cells, args.batch,
                                  group_mask(space, keep), args.steps, args.dw_impl,
                                  args.edge_loop)
    print(f"{name:6s} compile {compile_s:6.1f} s  step {step_s:.3f} s", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
