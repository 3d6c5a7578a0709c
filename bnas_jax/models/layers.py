"""Convolution, pooling and batch-norm primitives tuned for XLA on CPU (NHWC layout).

Why these exist: on CPU, XLA lowers a depthwise convolution written as
``lax.conv_general_dilated(..., feature_group_count=C)`` to a slow loop, and the gradients of
``lax.reduce_window`` pools to slow select-and-scatter kernels (figures: docs/performance.md and
``bench/bench_depthwise.py``). Here

* a depthwise k x k convolution is a sum of k*k shifted (strided) slices of the padded input, each
  multiplied by one per-channel weight vector ("shift and multiply"). XLA fuses the slices, products
  and sum into one loop, and the backward pass is the same pattern again; it equals
  ``lax.conv_general_dilated`` with ``feature_group_count=C`` (tested in ``tests/test_ops.py``);
* a 1 x 1 convolution is a matrix product over the channel axis (``dot_general``);
* a dense k x k convolution inside the supernet's edge loop is an im2col matrix product, or an
  XLA convolution whose backward pass is written in forward form (`conv`);
* 3 x 3 max and average pooling are shifted slices with custom VJPs (`max_pool`, `avg_pool`).

All functions are pure; kernels follow the PyTorch semantics of the referenced op (explicit
symmetric zero padding, ``floor((H + 2p - d(k-1) - 1) / s) + 1`` output size).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
PRNGKey = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
  """Output length of a convolution/pooling window along one axis (PyTorch formula)."""
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def torch_uniform(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a=sqrt 5)."""
  bound = 1.0 / np.sqrt(max(fan_in, 1))

  def init(key: PRNGKey, shape: Sequence[int], dtype=jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pad_hw(x: Array, padding: int, value: float = 0.0) -> Array:
  """Symmetric spatial padding of f32[B, H, W, C] by `padding` pixels filled with `value`."""
  if not padding:
    return x
  return lax.pad(x, jnp.asarray(value, x.dtype),
                 ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)))


def _window_slices(x: Array, kernel: int, stride: int, padding: int, dilation: int,
                   pad_value: float = 0.0):
  """Yields ((i, j), slice) for the kernel*kernel shifted, strided views of padded `x` [B,H,W,C]."""
  _, h, w, _ = x.shape
  ho = out_size(h, kernel, stride, padding, dilation)
  wo = out_size(w, kernel, stride, padding, dilation)
  x = _pad_hw(x, padding, pad_value)  # lax-level ops here: the supernet traces thousands
  for i in range(kernel):
    for j in range(kernel):
      r0, c0 = i * dilation, j * dilation
      yield (i, j), lax.slice(
          x, (0, r0, c0, 0),
          (x.shape[0], r0 + stride * (ho - 1) + 1, c0 + stride * (wo - 1) + 1, x.shape[3]),
          (1, stride, stride, 1))


def _transposed_pad(ct: Array, in_hw: tuple[int, int], kernel: int, stride: int, padding: int,
                    dilation: int = 1, value=0) -> Array:
  """Zero-interleaves and pads a window op's cotangent f32[B, Ho, Wo, C] for its transpose.

  The k*k stride-1 windows (dilation `dilation`) of the result, read with the taps flipped, are
  the transposed windows: input pixel (r, c) of an H x W = `in_hw` input sees, at slice offset
  (a, b), the cotangent of the output window whose tap (k-1-a, k-1-b) covered it. This writes a
  transposed window op as forward shifts of one buffer (no pads inside the fused loops). The
  result is f32[B, H + (k-1)d, W + (k-1)d, C], padded with `value`.
  """
  (h, w), (ho, wo) = in_hw, ct.shape[1:3]
  lo = (kernel - 1) * dilation - padding
  return lax.pad(ct, jnp.asarray(value, ct.dtype),
                 ((0, 0, 0), (lo, h + padding - (ho - 1) * stride - 1, stride - 1),
                  (lo, w + padding - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))


DW_IMPLS = ("auto", "shift_vjp", "shift", "scan", "patches", "lax")


def resolve_dw_impl(impl: str, platform: str | None = None) -> str:
  """The depthwise implementation that ``impl`` names on `platform`.

  ``'auto'`` picks the implementation with the fastest training step on the backend
  (``bench/bench_depthwise.py``, ``bench/bench_supernet.py``): ``'shift_vjp'`` on CPU and ``'lax'``
  (cuDNN / the TPU convolution unit) elsewhere. Other names are returned unchanged.

  Args:
    impl: one of `DW_IMPLS`.
    platform: ``'cpu'``, ``'gpu'``, ``'tpu'``...; None = ``jax.default_backend()``.

  Raises:
    ValueError: for a name not in `DW_IMPLS`.
  """
  if impl not in DW_IMPLS:
    raise ValueError(f"unknown depthwise impl {impl!r}; use one of {', '.join(DW_IMPLS)} "
                     "('auto' picks the fastest for the backend)")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  return "shift_vjp" if platform == "cpu" else "lax"


def depthwise_conv(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0,
                   dilation: int = 1, impl: str = "shift") -> Array:
  """Depthwise 2-D convolution (PyTorch ``Conv2d(C, C, k, groups=C, bias=False)``).

  Args:
    x: f32[B, H, W, C].
    kernel: f32[k, k, C] (one k x k filter per channel).
    stride, padding, dilation: as in PyTorch (symmetric zero padding).
    impl: ``'shift_vjp'`` ('shift' forward with a custom VJP: the input gradient is the same
      shift-and-multiply with the flipped kernel on the zero-interleaved cotangent, the kernel
      gradient one `lax.scan` over the taps; reverse-mode AD only, no jvp; the transpose of
      'shift' would be k*k pads that XLA cannot fuse well), ``'shift'`` (sum of k*k shifted
      slices times per-channel weights; every AD mode), ``'scan'`` (the same as a `lax.scan` over
      the taps: a smaller graph), ``'patches'`` (the k*k slices stacked, then one
      multiply-reduce; kept for benchmarks), ``'lax'`` (``lax.conv_general_dilated`` with
      ``feature_group_count=C``; the reference, and the choice on GPU) or ``'auto'``
      (`resolve_dw_impl`: 'shift_vjp' on CPU, else 'lax').

  Returns:
    f32[B, H_out, W_out, C].

  Raises:
    ValueError: on a kernel/input channel mismatch or an unknown `impl`.
  """
  impl = resolve_dw_impl(impl)
  k = kernel.shape[0]
  if kernel.shape != (k, k, x.shape[-1]):
    raise ValueError(f"depthwise kernel shape {kernel.shape} does not fit input {x.shape}; "
                     f"expected ({k}, {k}, {x.shape[-1]})")
  if impl == "lax":
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), [(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=_DN,
        feature_group_count=x.shape[-1])
  if impl == "scan":
    return _depthwise_scan(x, kernel, stride, padding, dilation)
  if impl == "shift_vjp":
    return _depthwise_shift_vjp(x, kernel, stride, padding, dilation)
  if impl == "patches":
    taps = [sl for _, sl in _window_slices(x, k, stride, padding, dilation)]
    patches = jnp.stack(taps, axis=-2)  # [B, Ho, Wo, k*k, C]
    return jnp.sum(patches * kernel.reshape(k * k, -1), axis=-2)
  return _depthwise_shift(x, kernel, stride, padding, dilation)


def _depthwise_shift(x, kernel, stride, padding, dilation):
  k = kernel.shape[0]
  rows = kernel.reshape(k * k, kernel.shape[-1])
  out = None
  for t, (_, sl) in enumerate(_window_slices(x, k, stride, padding, dilation)):
    wt = lax.broadcast_in_dim(lax.index_in_dim(rows, t, keepdims=False), sl.shape, (3,))
    term = lax.mul(sl, wt)
    out = term if out is None else lax.add(out, term)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shift_vjp(x, kernel, stride, padding, dilation):
  """'shift' forward; backward with the kernel gradient as one `lax.scan` over the taps."""
  return _depthwise_shift(x, kernel, stride, padding, dilation)


def _dsv_fwd(x, kernel, stride, padding, dilation):
  return _depthwise_shift(x, kernel, stride, padding, dilation), (x, kernel)


def _dsv_bwd(stride, padding, dilation, res, ct):
  x, kernel = res
  k = kernel.shape[0]
  b, h, w, c = x.shape
  ho, wo = ct.shape[1:3]
  # Input gradient: the transposed convolution is a stride-1 correlation of the cotangent
  # (zero-interleaved for stride > 1, zero-padded) with the flipped kernel: k*k slices of one
  # padded buffer, like the forward pass (transposing the slices instead would give k*k pads,
  # which XLA:CPU fuses badly; `bench/bench_depthwise.py`).
  ctp = _transposed_pad(ct, (h, w), k, stride, padding, dilation)
  dx = _depthwise_shift(ctp, kernel[::-1, ::-1], 1, 0, dilation)
  xp = _pad_hw(x, padding)
  # Default int dtype: the same as the literal 0 offsets of `dynamic_slice` (int64 under x64).
  taps = jnp.asarray([(i * dilation, j * dilation) for i in range(k) for j in range(k)])

  def body(_, off):
    sl = lax.dynamic_slice(xp, (0, off[0], off[1], 0),
                           (b, stride * (ho - 1) + 1, stride * (wo - 1) + 1, c))
    if stride > 1:
      sl = sl[:, ::stride, ::stride, :]
    return None, jnp.sum(sl * ct, axis=(0, 1, 2))

  _, dk = lax.scan(body, None, taps)
  return dx, dk.reshape(k, k, c)


_depthwise_shift_vjp.defvjp(_dsv_fwd, _dsv_bwd)


def _depthwise_scan(x: Array, kernel: Array, stride: int, padding: int, dilation: int) -> Array:
  """Shift-and-multiply as a `lax.scan` over the k*k taps (one compiled loop body)."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  ho = out_size(h, k, stride, padding, dilation)
  wo = out_size(w, k, stride, padding, dilation)
  xp = _pad_hw(x, padding)
  # Default int dtype: the same as the literal 0 offsets of `dynamic_slice` (int64 under x64).
  taps = jnp.asarray([(i * dilation, j * dilation) for i in range(k) for j in range(k)])

  def body(acc, tap):
    off, wt = tap
    sl = lax.dynamic_slice(xp, (0, off[0], off[1], 0),
                           (b, stride * (ho - 1) + 1, stride * (wo - 1) + 1, c))
    if stride > 1:
      sl = sl[:, ::stride, ::stride, :]
    return acc + sl * wt, None

  acc, _ = lax.scan(body, jnp.zeros((b, ho, wo, c), x.dtype), (taps, kernel.reshape(k * k, c)))
  return acc


CONV_IMPLS = ("lax", "im2col", "lax_vjp")


def conv(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0, dilation: int = 1,
         impl: str = "lax") -> Array:
  """Dense 2-D convolution, f32[B,H,W,Ci] x f32[k,k,Ci,Co] -> f32[B,Ho,Wo,Co] (no bias).

  1 x 1 kernels become a matrix product over the channel axis (after strided subsampling).

  Args:
    impl: ``'lax'`` (`lax.conv_general_dilated`), ``'im2col'`` (the k * k shifted windows
      concatenated along channels, then one matrix product with the ``[k * k * Ci, Co]`` kernel)
      or ``'lax_vjp'`` (reverse mode only: the 'lax' forward pass with a custom VJP whose input
      gradient is a plain forward convolution of the zero-interleaved, padded cotangent with the
      flipped kernel, and whose kernel gradient is one matrix product of the cotangent and a
      window slice per tap).
      Inside a loop body (the supernet's `lax.scan` over edges) XLA:CPU runs the convolutions
      that JAX's own transpose rules emit (kernel gradient ``f01b_i01o->01bf``, input gradient
      with an ``oi`` kernel) as slow generic loops, while the forward convolution and matrix
      products keep their speed there (docs/performance.md). Outside loops 'lax' is the better
      choice.

  Raises:
    ValueError: on a kernel/input channel mismatch or an unknown `impl`.
  """
  k = kernel.shape[0]
  if kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"conv kernel {kernel.shape} does not fit input channels {x.shape[-1]}")
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; use one of {', '.join(CONV_IMPLS)}")
  if k == 1 and padding == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.dot(x, kernel[0, 0])
  if impl == "im2col":
    return jnp.dot(_im2col(x, k, stride, padding, dilation),
                   kernel.reshape(k * k * kernel.shape[2], kernel.shape[3]))
  if impl == "lax_vjp":
    return _conv_lax_vjp(x, kernel, stride, padding, dilation)
  return _conv_lax(x, kernel, stride, padding, dilation)


def _im2col(x: Array, k: int, stride: int, padding: int, dilation: int) -> Array:
  """f32[B, H, W, Ci] -> f32[B, Ho, Wo, k * k * Ci]: the windows, taps row-major, then channels."""
  return lax.concatenate([s for _, s in _window_slices(x, k, stride, padding, dilation)], 3)


def _conv_lax(x, kernel, stride, padding, dilation):
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  rhs_dilation=(dilation, dilation), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_lax_vjp(x, kernel, stride, padding, dilation):
  """`_conv_lax` with a backward pass of forward-form convolutions and matrix products."""
  return _conv_lax(x, kernel, stride, padding, dilation)


def _clv_fwd(x, kernel, stride, padding, dilation):
  return _conv_lax(x, kernel, stride, padding, dilation), (x, kernel)


def _clv_bwd(stride, padding, dilation, res, ct):
  x, kernel = res
  k, _, ci, co = kernel.shape
  # Input gradient: a stride-1 correlation of the zero-interleaved, padded cotangent with the
  # spatially flipped kernel whose in/out channels are swapped (an explicit HWIO kernel).
  ctp = _transposed_pad(ct, x.shape[1:3], k, stride, padding, dilation)
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx = _conv_lax(ctp, flipped, 1, 0, dilation)
  # Kernel gradient: tap (i, j) is the cotangent against the input's window slice, summed over
  # batch and positions: one ``[Co, Ci]`` matrix product per tap, transposed at the end. The
  # same sums as ``im2col(x)^T @ ct`` without the k*k-wide window buffer; with the cotangent on
  # the left, XLA:CPU transposes it once for all taps instead of transposing every slice.
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  dk = lax.concatenate([lax.dot_general(ct, sl, contract)[None] for _, sl in _window_slices(
      x, k, stride, padding, dilation)], 0)  # [k * k, Co, Ci]
  return dx, jnp.transpose(dk, (0, 2, 1)).reshape(k, k, ci, co)


_conv_lax_vjp.defvjp(_clv_fwd, _clv_bwd)


def _axis_shifts(a: Array, kernel: int, stride: int, axis: int, n_out: int):
  """Yields the `kernel` strided shifts of `a` along `axis`, each `n_out` long there."""
  for i in range(kernel):
    start, limit, strides = [0] * a.ndim, list(a.shape), [1] * a.ndim
    start[axis], limit[axis], strides[axis] = i, i + stride * (n_out - 1) + 1, stride
    yield lax.slice(a, start, limit, strides)


def _window_max(a: Array, kernel: int, stride: int, axis: int, n_out: int) -> Array:
  """Max over `kernel` strided shifts of `a` along `axis` (one stage of the separable max)."""
  out = None
  for sl in _axis_shifts(a, kernel, stride, axis, n_out):
    out = sl if out is None else lax.max(out, sl)
  return out


def _max_argmax(x: Array, kernel: int, stride: int, padding: int,
                pad_value: float) -> tuple[Array, Array]:
  """Window maximum f32[B, Ho, Wo, C] and the tap of its first maximal element, int8[B, Ho, Wo, C].

  Taps are numbered row-major (``i * kernel + j``); NaN counts as the maximum (as in PyTorch).
  """
  best = idx = None
  for t, (_, sl) in enumerate(_window_slices(x, kernel, stride, padding, 1, pad_value)):
    if best is None:
      best, idx = sl, jnp.zeros(sl.shape, jnp.int8)
      continue
    take = lax.bitwise_or(lax.gt(sl, best), lax.ne(sl, sl))
    best = lax.select(take, sl, best)
    idx = lax.select(take, lax.full_like(idx, t), idx)
  return best, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_vjp(x: Array, kernel: int, stride: int, padding: int, pad_value: float) -> Array:
  """Max pool whose gradient goes to the first maximal element of each window (PyTorch's rule)."""
  return _max_argmax(x, kernel, stride, padding, pad_value)[0]


def _max_pool_vjp_fwd(x, kernel, stride, padding, pad_value):
  y, idx = _max_argmax(x, kernel, stride, padding, pad_value)
  # The input's spatial size rides along as the shape of an empty array (residuals are arrays).
  return y, (idx, jnp.zeros((0, x.shape[1], x.shape[2]), jnp.int8))


def _max_pool_vjp_bwd(kernel, stride, padding, pad_value, res, ct):
  del pad_value
  idx, hw = res
  # dx[r, c] = sum over the windows covering (r, c) of their cotangent where their argmax tap is
  # (r, c): k*k forward shifts of the padded cotangent and tap buffers, offset t <-> tap k*k-1-t.
  ctp = _transposed_pad(ct, hw.shape[1:], kernel, stride, padding)
  idp = _transposed_pad(idx, hw.shape[1:], kernel, stride, padding, value=-1)
  zero = jnp.zeros((), ct.dtype)
  dx = None
  for t, ((_, g), (_, tap)) in enumerate(zip(_window_slices(ctp, kernel, 1, 0, 1),
                                             _window_slices(idp, kernel, 1, 0, 1))):
    hit = lax.eq(tap, lax.full_like(tap, kernel * kernel - 1 - t))
    term = lax.select(hit, g, lax.broadcast(zero, g.shape))
    dx = term if dx is None else lax.add(dx, term)
  return (dx,)


_max_pool_vjp.defvjp(_max_pool_vjp_fwd, _max_pool_vjp_bwd)


def max_pool(x: Array, kernel: int = 3, *, stride: int = 1, padding: int = 1,
             pad_value: float = -jnp.inf, impl: str = "shift") -> Array:
  """k x k max pooling, f32[B,H,W,C] -> f32[B,Ho,Wo,C].

  `pad_value` = -inf reproduces ``nn.MaxPool2d(k, s, p)``; 0.0 reproduces the BayesNAS op
  (zero padding, then a max pool; spec 2.1).

  On XLA:CPU the gradient of `lax.reduce_window(max)` is a slow select-and-scatter. Here:

  * ``impl='shift_vjp'`` (reverse mode only; the CPU training default, like the depthwise impl of
    the same name): the forward pass keeps the running maximum and its window tap (int8) over the
    k*k shifted slices in one fused loop; the backward pass sends each window's cotangent to that
    tap, as k*k forward shifts of the padded cotangent and tap buffers (`_transposed_pad`). This
    is PyTorch's rule (the first maximal element of the window, row-major) and equals the
    `reduce_window` gradient.
  * any other name: the max is separable (rows, then columns) over shifted strided slices, with
    plain autodiff (every AD mode). Ties share the gradient pairwise (1/4, 1/4, 1/2 per axis):
    also a valid subgradient; both forms agree without ties.

  Args:
    impl: ``'shift_vjp'`` for the custom VJP; any other depthwise impl name: plain autodiff.
  """
  if impl == "shift_vjp":
    return _max_pool_vjp(x, kernel, stride, padding, pad_value)
  _, h, w, _ = x.shape
  ho, wo = out_size(h, kernel, stride, padding), out_size(w, kernel, stride, padding)
  x = _pad_hw(x, padding, pad_value)
  return _window_max(_window_max(x, kernel, stride, 1, ho), kernel, stride, 2, wo)


def _box_sum(x: Array, kernel: int, stride: int, padding: int) -> Array:
  """Sum over each k x k window of zero-padded `x` (k*k shifted slices, one fused loop)."""
  out = None
  for _, sl in _window_slices(x, kernel, stride, padding, 1):
    out = sl if out is None else lax.add(out, sl)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _box_sum_vjp(x: Array, kernel: int, stride: int, padding: int) -> Array:
  """`_box_sum` whose transpose is the same box sum of the padded cotangent (see `avg_pool`)."""
  return _box_sum(x, kernel, stride, padding)


def _box_sum_vjp_fwd(x, kernel, stride, padding):
  return _box_sum(x, kernel, stride, padding), jnp.zeros((0, x.shape[1], x.shape[2]), jnp.int8)


def _box_sum_vjp_bwd(kernel, stride, padding, hw, ct):
  return (_box_sum(_transposed_pad(ct, hw.shape[1:], kernel, stride, padding), kernel, 1, 0),)


_box_sum_vjp.defvjp(_box_sum_vjp_fwd, _box_sum_vjp_bwd)


def avg_pool(x: Array, kernel: int = 3, *, stride: int = 1, padding: int = 1,
             count_include_pad: bool = True, impl: str = "shift") -> Array:
  """k x k average pooling with zero padding, f32[B,H,W,C] -> f32[B,Ho,Wo,C].

  ``count_include_pad=True`` divides by k*k (PyTorch default; the BayesNAS op); ``False`` divides
  by the number of real (unpadded) pixels in the window (DARTS / NAS-Bench-201).

  Args:
    impl: ``'shift_vjp'`` (reverse mode only; the CPU training default, like the depthwise impl of
      the same name): the window sums are k*k shifted slices in one fused loop, with a custom VJP
      whose transpose is the same box sum of the zero-interleaved, padded cotangent. Any other
      depthwise impl name: `lax.reduce_window` (every AD mode).
  """
  if impl == "shift_vjp":
    s = _box_sum_vjp(x, kernel, stride, padding)
  else:
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    s = lax.reduce_window(x, 0.0, lax.add, (1, kernel, kernel, 1), (1, stride, stride, 1), pads)
  if count_include_pad:
    with jax.named_scope(AVG_POOL_SCOPE):
      return s / float(kernel * kernel)
  ones = np.ones((1, x.shape[1], x.shape[2], 1), np.float32)
  pads_np = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
  onesp = np.pad(ones, pads_np)
  ho = out_size(x.shape[1], kernel, stride, padding)
  wo = out_size(x.shape[2], kernel, stride, padding)
  cnt = np.zeros((1, ho, wo, 1), np.float32)
  for i in range(kernel):
    for j in range(kernel):
      cnt += onesp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
  with jax.named_scope(AVG_POOL_SCOPE):
    return s / jnp.asarray(cnt)


# Named scopes (`jax.named_scope`) around the normalising division of `avg_pool` and around
# `global_avg_pool`: `bnas_jax.fast_hessian` finds these coefficients by name for the original
# code's pool constants (its ``fidelity`` option). They do not change any value.
AVG_POOL_SCOPE = "avg_pool_normalise"
GLOBAL_AVG_POOL_SCOPE = "global_avg_pool"


def global_avg_pool(x: Array) -> Array:
  """Mean over the spatial axes, f32[B, H, W, C] -> f32[B, C] (in scope `GLOBAL_AVG_POOL_SCOPE`)."""
  with jax.named_scope(GLOBAL_AVG_POOL_SCOPE):
    return jnp.mean(x, axis=(1, 2))


_FROZEN_BATCH_STATS = contextvars.ContextVar("bnas_jax_frozen_batch_stats", default=False)


@contextlib.contextmanager
def frozen_batch_stats() -> Iterator[None]:
  """Trace-time switch: train-mode batch statistics are constants for differentiation.

  Inside the context, `batch_norm_stats` returns the same values but with ``stop_gradient``, so
  every derivative (grad, jvp, vjp, hessian) of a function traced there treats each batch norm as
  the fixed affine map ``(x - mean) * rsqrt(var + eps)`` with this batch's statistics. This is the
  loss whose curvature the Laplace step uses (``bnas_jax.curvature`` module docstring). Enter it
  inside the function that is traced (e.g. in the ``apply_fn`` of a curvature estimator) so that
  every trace of that function sees it.
  """
  token = _FROZEN_BATCH_STATS.set(True)
  try:
    yield
  finally:
    _FROZEN_BATCH_STATS.reset(token)


def batch_norm_stats(x: Array) -> tuple[Array, Array]:
  """Per-channel batch mean and biased variance of f32[B, H, W, C] -> (f32[C], f32[C]).

  Under `frozen_batch_stats` both are ``stop_gradient``-ed (same values, no derivative).
  """
  if _FROZEN_BATCH_STATS.get():
    x = lax.stop_gradient(x)
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.maximum(jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
  return mean, var

