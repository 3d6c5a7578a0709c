"""Forms of the dense-conv kernel gradient inside the supernet's edge loop (`layers.conv`'s VJP).

Each form is the kernel gradient of `layers.conv(impl='lax_vjp')`'s custom VJP (the input
gradient is the same in all): ``taps`` (the library's: one ``ct x window slice`` product per tap,
the cotangent on the left), ``taps_slice_left`` (the same products with the slice on the left),
``im2col`` (the k * k window slices concatenated, then ``cols^T @ ct``: the earlier form),
``im2col_ct_left`` (the same buffer with the cotangent on the left) and ``conv`` (a forward-form
convolution with batch and feature axes swapped). The program is `bench_loop_conv.py`'s: an
8-edge `lax.scan` of ``h <- h + conv(relu(h), kernel_e)`` with `jax.checkpoint` edges, forward +
backward, stride 1. Prints per form the compile time, the median run time and the largest
relative difference from the first form's values and gradients.

Usage:
  python bench/bench_conv_kgrad.py                      # C = 8 on 32 x 32, 5 x 5, dilation 2
  python bench/bench_conv_kgrad.py --channels 36 --size 36
  python bench/bench_conv_kgrad.py --forms taps,im2col --kernel 3

Timings are wall-clock on whatever else runs on the machine: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import bench_loop_conv  # bench/ is on sys.path
from bnas_jax.models import layers

_CONTRACT = (((0, 1, 2), (0, 1, 2)), ((), ()))


def _slices(x, k, s, p, d):
  return [sl for _, sl in layers._window_slices(x, k, s, p, d)]  # pylint: disable=protected-access


def kgrad_taps_slice_left(x, ct, k, s, p, d):
  return jnp.concatenate([lax.dot_general(sl, ct, _CONTRACT) for sl in _slices(x, k, s, p, d)], 0)


def kgrad_im2col(x, ct, k, s, p, d):
  cols = layers._im2col(x, k, s, p, d)  # pylint: disable=protected-access
  return lax.dot_general(cols, ct, _CONTRACT)


def kgrad_im2col_ct_left(x, ct, k, s, p, d):
  cols = layers._im2col(x, k, s, p, d)  # pylint: disable=protected-access
  return jnp.transpose(lax.dot_general(ct, cols, _CONTRACT))


def kgrad_conv(x, ct, k, s, p, d):
  h, w = x.shape[1:3]
  ho, wo = ct.shape[1:3]
  span_h, span_w = (k - 1) * d + (ho - 1) * s + 1, (k - 1) * d + (wo - 1) * s + 1
  xp = lax.pad(x, 0.0, ((0, 0, 0), (p, max(span_h - h - p, 0), 0), (p, max(span_w - w - p, 0), 0),
                        (0, 0, 0)))[:, :span_h, :span_w, :]
  out = lax.conv_general_dilated(jnp.transpose(xp, (3, 1, 2, 0)), jnp.transpose(ct, (1, 2, 0, 3)),
                                 (d, d), [(0, 0)] * 2, rhs_dilation=(s, s),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [Ci, k, k, Co]
  return jnp.transpose(out, (1, 2, 0, 3)).reshape(k * k * x.shape[-1], ct.shape[-1])


FORMS = {"taps": None, "taps_slice_left": kgrad_taps_slice_left, "im2col": kgrad_im2col,
         "im2col_ct_left": kgrad_im2col_ct_left, "conv": kgrad_conv}


def make_conv(form: str):
  """`layers.conv(impl='lax_vjp')` with the kernel gradient of `form`."""
  if FORMS[form] is None:
    return functools.partial(layers.conv, impl="lax_vjp")
  kgrad = FORMS[form]

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def conv(x, kernel, stride, padding, dilation):
    return layers._conv_lax(x, kernel, stride, padding, dilation)  # pylint: disable=protected-access

  def fwd(x, kernel, stride, padding, dilation):
    return conv(x, kernel, stride, padding, dilation), (x, kernel)

  def bwd(stride, padding, dilation, res, ct):
    x, kernel = res
    dx, _ = layers._clv_bwd(stride, padding, dilation, res, ct)  # pylint: disable=protected-access
    k, _, ci, co = kernel.shape
    return dx, kgrad(x, ct, k, stride, padding, dilation).reshape(k, k, ci, co)

  conv.defvjp(fwd, bwd)
  return lambda x, kernel, *, stride, padding, dilation: conv(x, kernel, stride, padding, dilation)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_loop_conv.add_shape_args(p)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--forms", default=",".join(FORMS), help="comma list of " + ", ".join(FORMS))
  a = p.parse_args()
  forms = a.forms.split(",")
  for f in forms:
    if f not in FORMS:
      raise SystemExit(f"--forms: unknown form {f!r}; choose from {', '.join(FORMS)}")
  padding = a.dilation * (a.kernel - 1) // 2
  kernels, x = bench_loop_conv.inputs(a)
  print(f"{a.kernel} x {a.kernel} conv, dilation {a.dilation}, f32{list(x.shape)}, {a.edges} "
        "edges, fwd + bwd", flush=True)
  ref = None
  for form in forms:
    fn = bench_loop_conv.loop_program(functools.partial(
        make_conv(form), stride=1, padding=padding, dilation=a.dilation))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(kernels, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(kernels, x))
      times.append(time.perf_counter() - t0)
    ref = out if ref is None else ref
    err = max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
              for u, v in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    print(f"{form:16s} compile {compile_s:6.2f} s  run {statistics.median(times) * 1e3:8.1f} ms  "
          f"max rel. diff {err:.1e}", flush=True)


if __name__ == "__main__":
  main()
