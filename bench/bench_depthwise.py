"""Benchmark of the depthwise-conv implementations (`bnas_jax.models.layers.depthwise_conv`).

For the depthwise convs of a supernet at its three resolutions (each edge's depthwise conv is one
such call in the supernet's edge loop), it times forward + backward (gradients w.r.t. input and
kernel) of every implementation on this machine's default device and prints a table, then the
fastest implementation over all shapes as the last line (``best: <impl>``), so a script can pass
it to ``--config.model.dw_impl``.

Usage:
  python bench/bench_depthwise.py                       # official supernet shapes (C = 36, B = 18)
  python bench/bench_depthwise.py --channels 8 --batch 32 --impls shift,shift_vjp
  python bench/bench_depthwise.py --json /tmp/dw.json   # also write the figures as JSON

Timings are medians of wall-clock repeats after a warm-up call (device work synchronised with
`block_until_ready`); treat them as noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from bnas_jax.models import layers

IMPLS = ("lax", "shift", "shift_vjp")


def shapes(channels: int, batch: int, groups: int) -> list[tuple[tuple[int, ...], int]]:
  """[(input shape f32[B, H, W, G*C'], kernel size)] for the three resolutions of a CIFAR supernet.

  C' doubles at each reduction (C, 2C, 4C at 32, 16, 8 pixels); k in (3, 5) as in sep_conv_3x3/5x5.
  """
  out = []
  for level in range(3):
    size, c = 32 >> level, channels << level
    for k in (3, 5):
      out.append(((batch, size, size, groups * c), k))
  return out


def time_impl(impl: str, shape: tuple[int, ...], k: int, *, repeats: int, seed: int = 0) -> float:
  """Median seconds of one forward + backward of `depthwise_conv(impl=impl)` on `shape`."""
  kx, kk, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, shape, jnp.float32)
  kernel = jax.random.normal(kk, (k, k, shape[-1]), jnp.float32) / k
  ct = jax.random.normal(kc, shape, jnp.float32)

  def loss(x, kernel):
    y = layers.depthwise_conv(x, kernel, padding=k // 2, impl=impl)
    return jnp.vdot(y, ct)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready(fn(x, kernel))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, kernel))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--channels", type=int, default=36, help="C of the supernet (official 36)")
  parser.add_argument("--batch", type=int, default=18, help="batch size (official 18)")
  parser.add_argument("--groups", type=int, default=1,
                      help="channel multiplier (1: one edge's input, as in the supernet)")
  parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of implementations")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json", default="", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  impls = [s for s in args.impls.split(",") if s]
  for impl in impls:
    if impl not in ("lax", "shift", "shift_vjp", "scan", "patches"):
      parser.error(f"--impls: unknown implementation {impl!r}")

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
  rows, total = [], {impl: 0.0 for impl in impls}
  print(f"{'input':>22} {'k':>2} " + " ".join(f"{impl:>10}" for impl in impls) + "   (ms)")
  for shape, k in shapes(args.channels, args.batch, args.groups):
    row = {"shape": list(shape), "k": k}
    for impl in impls:
      t = time_impl(impl, shape, k, repeats=args.repeats)
      row[impl] = t
      total[impl] += t
    rows.append(row)
    print(f"{str(shape):>22} {k:>2} " + " ".join(f"{1e3 * row[i]:10.3f}" for i in impls))
  print(f"{'sum':>25} " + " ".join(f"{1e3 * total[i]:10.3f}" for i in impls))
  best = min(impls, key=lambda i: total[i])
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"platform": jax.devices()[0].platform, "rows": rows,
                 "total_s": total, "best": best}, f, indent=1)
  print(f"best: {best}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
