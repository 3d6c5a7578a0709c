"""A dense convolution inside a `lax.scan` body, per `layers.conv` impl (the supernet edge loop).

The loop runs `--edges` iterations of ``h <- h + conv(relu(h), kernel_e)`` (stacked kernels, the
carry f32[B, H, H, C], a `jax.checkpoint` body as with the supernet's `remat`), then a squared
sum; the program is its forward + backward pass. For each impl it prints the compile time, the
median run time and the dimension labels of the convolutions XLA:CPU compiled (``b01f_01io->b01f``
is the forward form; the other forms are what JAX's transpose rules emit). Each impl is also run
unrolled (a Python loop) with ``--unroll``, for the cost of the loop itself.

Usage:
  python bench/bench_loop_conv.py                        # C = 8, 5 x 5, dilation 2, batch 18
  python bench/bench_loop_conv.py --channels 36 --kernel 3

Timings are wall-clock on whatever else runs on the machine: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from bnas_jax.models import layers


def program(impl: str, padding: int, dilation: int, unroll: bool):
  """Jitted ``(kernels f32[E, k, k, C, C], x f32[B, H, W, C]) -> (loss, gradients)``."""
  return loop_program(
      functools.partial(layers.conv, padding=padding, dilation=dilation, impl=impl), unroll)


def loop_program(conv, unroll: bool = False):
  """`program` for any ``conv(x f32[B, H, W, C], kernel f32[k, k, C, C]) -> f32[B, H, W, C]``."""

  @jax.checkpoint
  def body(h, k):
    return h + conv(jax.nn.relu(h), k), None

  def loss(ks, x):
    if unroll:
      h = x
      for e in range(ks.shape[0]):
        h, _ = body(h, ks[e])
    else:
      h, _ = lax.scan(body, x, ks)
    return jnp.sum(h ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def add_shape_args(p: argparse.ArgumentParser) -> None:
  """The loop's shape flags: --batch, --size, --channels, --kernel, --dilation, --edges."""
  p.add_argument("--batch", type=int, default=18)
  p.add_argument("--size", type=int, default=32, help="H = W")
  p.add_argument("--channels", type=int, default=8)
  p.add_argument("--kernel", type=int, default=5)
  p.add_argument("--dilation", type=int, default=2)
  p.add_argument("--edges", type=int, default=8)


def inputs(a):
  """``(kernels f32[E, k, k, C, C], x f32[B, H, W, C])`` for the flags of `add_shape_args`."""
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (a.batch, a.size, a.size, a.channels))
  return 0.1 * jax.random.normal(kk, (a.edges, a.kernel, a.kernel, a.channels, a.channels)), x


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_shape_args(p)
  p.add_argument("--impls", default="lax,im2col,lax_vjp")
  p.add_argument("--unroll", action="store_true", help="also the unrolled loop of each impl")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  ks, x = inputs(a)
  pad = a.dilation * (a.kernel - 1) // 2
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; x f32{list(x.shape)}, "
        f"{a.edges} edges of a {a.kernel} x {a.kernel} conv, dilation {a.dilation}, fwd + bwd")
  for unroll in (False, True) if a.unroll else (False,):
    for impl in a.impls.split(","):
      t0 = time.perf_counter()
      compiled = program(impl, pad, a.dilation, unroll).lower(ks, x).compile()
      compile_s = time.perf_counter() - t0
      labels = collections.Counter(re.findall(r"convolution\(.*?dim_labels=([^,\s]+)",
                                              compiled.as_text()))
      jax.block_until_ready(compiled(ks, x))
      times = []
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(ks, x))
        times.append(time.perf_counter() - t0)
      loop = "unrolled" if unroll else "scan"
      run_ms = 1e3 * statistics.median(times)
      print(f"{impl:8s} {loop:8s} compile {compile_s:5.2f} s  run {run_ms:7.1f} ms  "
            f"convolutions {dict(labels) or '-'}", flush=True)


if __name__ == "__main__":
  main()
