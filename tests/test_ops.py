"""Tests of the candidate ops (bnas_jax.models.ops) and conv primitives (bnas_jax.models.layers)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnas_jax.models import layers
from bnas_jax.models import ops as ops_lib
from bnas_jax.search_space import spaces

C = 8


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------------------------------------
# Shapes and parameter counts.

_SPACE_OPS = {f: [n for n in ops_lib.OPS[f]] for f in ops_lib.OPS}


@pytest.mark.parametrize("family,name", [(f, n) for f in _SPACE_OPS for n in _SPACE_OPS[f]])
@pytest.mark.parametrize("stride", [1, 2])
def test_op_output_shape(family, name, stride):
  x = jnp.zeros((2, 16, 16, C))
  m = ops_lib.get_op(family, name, C, stride)

  def run():
    v = m.init(jax.random.key(0), x, train=True)
    return m.apply(v, x, train=True, mutable=["batch_stats"])[0]

  y = jax.eval_shape(run)
  always_reduces = name in ("factorized_reduce",)
  s = 2 if always_reduces else stride
  assert y.shape == (2, 16 // s, 16 // s, C)


def test_every_space_op_is_registered():
  for name in ("bayesnas", "darts", "nb201"):
    sp = spaces.get_space(name)
    assert set(sp.ops) <= set(ops_lib.OPS[sp.family])
  assert "none" in ops_lib.OPS["darts"] and "none" in ops_lib.OPS["nb201"]


def _n_params(family, name, c, stride, c_in=None, **options):
  x = jnp.zeros((2, 8, 8, c_in or c))
  m = ops_lib.get_op(family, name, c, stride, ops_lib.OpOptions(**options))
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=True))
  return _count(v.get("params", {}))


@pytest.mark.parametrize("c", [8, 36])
def test_param_counts_closed_form(c):
  """conv = out * in/groups * k * k (no bias), BN = 2C (affine) (DARTS / AutoDL / spec 2.1)."""
  k2 = {3: 9, 5: 25}
  for k in (3, 5):
    # BayesNAS: twice [BN(2C) + dw k*k*C + 1x1 C^2]; dil: BN + full k*k*C^2 + 1x1 C^2.
    assert _n_params("bayesnas", f"sep{k}", c, 1) == 2 * (2 * c + k2[k] * c + c * c)
    assert _n_params("bayesnas", f"dil{k}", c, 2) == 2 * c + k2[k] * c * c + c * c
    # DARTS: SepConv twice [dw + 1x1 + BN]; DilConv dw + 1x1 + BN.
    assert _n_params("darts", f"sep_conv_{k}x{k}", c, 1) == 2 * (k2[k] * c + c * c + 2 * c)
    assert _n_params("darts", f"dil_conv_{k}x{k}", c, 1) == k2[k] * c + c * c + 2 * c
    assert _n_params("darts", f"sep_conv_{k}x{k}", c, 1, affine=False) == 2 * (k2[k] * c + c * c)
  assert _n_params("bayesnas", "ident", c, 1) == 0
  assert _n_params("bayesnas", "ident", c, 2) == 2 * c + c * c
  assert _n_params("bayesnas", "creduct", c, 1, c_in=3 * c) == 2 * 3 * c + 3 * c * c
  assert _n_params("bayesnas", "creduct", c, 2, c_in=2 * c) == 4 * c * c + 2 * 2 * c + 2 * c * c
  assert _n_params("darts", "skip_connect", c, 2) == c * c + 2 * c  # two C x C/2 convs + BN
  assert _n_params("darts", "skip_connect", c, 2, affine=False) == c * c
  # AutoDL: ReLUConvBN has a conv bias iff affine=False.
  assert _n_params("nb201", "nor_conv_3x3", c, 1) == 9 * c * c + 2 * c
  assert _n_params("nb201", "nor_conv_3x3", c, 1, affine=False) == 9 * c * c + c
  assert _n_params("nb201", "nor_conv_1x1", c, 1) == c * c + 2 * c
  # ResNet basic block C -> 2C, stride 2: two ReLUConvBN 3x3 + 1x1 downsample conv (no bias).
  assert _n_params("nb201", "resnet_basic_block", 2 * c, 2, c_in=c) == (
      9 * c * 2 * c + 2 * 2 * c + 9 * 4 * c * c + 2 * 2 * c + c * 2 * c)


# ------------------------------------------------------------------------------------------------
# Fast primitives against lax / numpy references.


def test_auto_depthwise_impl_is_shift_vjp_on_cpu_and_lax_on_accelerators():
  assert layers.resolve_dw_impl("auto", "cpu") == "shift_vjp"
  assert layers.resolve_dw_impl("auto", "gpu") == "lax"
  assert layers.resolve_dw_impl("auto", "tpu") == "lax"
  for impl in layers.DW_IMPLS[1:]:
    assert layers.resolve_dw_impl(impl, "gpu") == impl
  with pytest.raises(ValueError, match="unknown depthwise impl 'shfit'.*auto"):
    layers.resolve_dw_impl("shfit")
  with pytest.raises(ValueError, match="unknown depthwise impl"):
    layers.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3)), impl="cudnn")


@pytest.mark.parametrize("impl", ["shift", "shift_vjp", "scan", "patches", "auto"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_fast_depthwise_equals_lax_conv(k, stride, dilation, impl):
  x = _x((2, 11, 12, 5))
  w = _x((k, k, 5), seed=1)
  pad = dilation * (k - 1) // 2
  ref = lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), [(pad, pad)] * 2,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=5)
  # Each side compiled as one program (eagerly, every op would be compiled on its own).
  fast = jax.jit(functools.partial(layers.depthwise_conv, stride=stride, padding=pad,
                                   dilation=dilation, impl=impl))(x, w)
  np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
  # Gradients (the backward pass is a different computation) agree as well.
  ct = _x(ref.shape, seed=2)
  g_fast = jax.jit(jax.grad(lambda a, b: jnp.sum(ct * layers.depthwise_conv(
      a, b, stride=stride, padding=pad, dilation=dilation, impl=impl)), argnums=(0, 1)))(x, w)
  g_ref = jax.jit(jax.grad(lambda a, b: jnp.sum(ct * layers.depthwise_conv(
      a, b, stride=stride, padding=pad, dilation=dilation, impl="lax")), argnums=(0, 1)))(x, w)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["im2col", "lax_vjp"])
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 2), (5, 1, 2), (5, 2, 1)])
def test_im2col_and_lax_vjp_convs_equal_lax_conv_with_gradients(k, stride, dilation, impl):
  # Odd and even sizes (11 x 10), so stride 2 drops a row but not a column.
  x = _x((2, 11, 10, 3))
  w = _x((k, k, 3, 4), seed=1)
  pad = dilation * (k - 1) // 2
  ref = lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = jax.jit(functools.partial(layers.conv, stride=stride, padding=pad, dilation=dilation,
                                  impl=impl))(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  ct = _x(ref.shape, seed=2)
  grads = [jax.jit(jax.grad(lambda a, b, impl=impl: jnp.sum(ct * layers.conv(
      a, b, stride=stride, padding=pad, dilation=dilation, impl=impl)), argnums=(0, 1)))(x, w)
           for impl in (impl, "lax")]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="unknown conv impl 'cudnn'"):
    layers.conv(x, w, padding=pad, impl="cudnn")


def _np_pool(x, stride, kind, pad_value, count_include_pad):
  b, h, w, c = x.shape
  xp = np.full((b, h + 2, w + 2, c), pad_value, np.float64)
  xp[:, 1:-1, 1:-1] = x
  valid = np.zeros((h + 2, w + 2))
  valid[1:-1, 1:-1] = 1
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * stride:i * stride + 3, j * stride:j * stride + 3]
      if kind == "max":
        out[:, i, j] = win.max(axis=(1, 2))
      else:
        n = 9 if count_include_pad else valid[i * stride:i * stride + 3,
                                              j * stride:j * stride + 3].sum()
        out[:, i, j] = np.where(np.isfinite(win), win, 0).sum(axis=(1, 2)) / n
  return out


@pytest.mark.parametrize("stride", [1, 2])
def test_pool_semantics_match_numpy(stride):
  x = np.asarray(_x((2, 7, 6, 3))) - 1.0  # mostly negative: zero padding changes max pool output
  cases = [("bayesnas", "max", "max", 0.0, True), ("bayesnas", "avg", "avg", 0.0, True),
           ("darts", "max_pool_3x3", "max", -np.inf, True),
           ("darts", "avg_pool_3x3", "avg", 0.0, False),
           ("nb201", "avg_pool_3x3", "avg", 0.0, False)]
  for family, name, kind, pad_value, cip in cases:
    m = ops_lib.get_op(family, name, 3, stride)
    y = m.apply({}, jnp.asarray(x), train=True)
    np.testing.assert_allclose(y, _np_pool(x, stride, kind, pad_value, cip), rtol=1e-5,
                               atol=1e-6, err_msg=f"{family}/{name}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad_value", [-np.inf, 0.0])
@pytest.mark.parametrize("impl", ["shift", "shift_vjp"])
def test_max_pool_value_and_gradient_equal_reduce_window(stride, pad_value, impl):
  x = _x((2, 9, 8, 3)) - 0.5

  def ref(a):
    a = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
    return lax.reduce_window(a, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), "VALID")

  fast = lambda a: layers.max_pool(a, 3, stride=stride, padding=1, pad_value=pad_value,
                                   impl=impl)
  np.testing.assert_array_equal(jax.jit(fast)(x), jax.jit(ref)(x))
  ct = _x(ref(x).shape, seed=3)
  g_fast = jax.jit(jax.grad(lambda a: jnp.sum(ct * fast(a))))(x)
  g_ref = jax.jit(jax.grad(lambda a: jnp.sum(ct * ref(a))))(x)
  np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6, atol=1e-6)


def _np_max_pool_grad_first_max(x, ct, stride, pad_value):
  """Numpy reference of PyTorch's max-pool gradient: each 3 x 3 window's cotangent goes to its
  first maximal element in row-major order (padding included; a pad's share is dropped)."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
  g = np.zeros_like(xp)
  for n in range(x.shape[0]):
    for c in range(x.shape[3]):
      for i in range(ct.shape[1]):
        for j in range(ct.shape[2]):
          win = xp[n, i * stride:i * stride + 3, j * stride:j * stride + 3, c]
          a, b = np.unravel_index(np.argmax(win), win.shape)  # first maximum, row-major
          g[n, i * stride + a, j * stride + b, c] += ct[n, i, j, c]
  return g[:, 1:-1, 1:-1]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad_value", [-np.inf, 0.0])
def test_max_pool_vjp_sends_ties_to_the_first_maximum(stride, pad_value):
  """Ties (plateaus of equal values, and all-zero windows with the BayesNAS zero padding): the
  custom VJP gives each window's cotangent to its first maximal element, as PyTorch does."""
  x = np.round(np.array(_x((2, 7, 6, 3))) * 2) / 2 - 0.5  # values in steps of 0.5: many ties
  x[0, :4, :4, 0] = 0.0
  x = jnp.asarray(x)
  out = layers.max_pool(x, 3, stride=stride, padding=1, pad_value=pad_value, impl="shift_vjp")
  ct = _x(out.shape, seed=3)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(ct * layers.max_pool(
      a, 3, stride=stride, padding=1, pad_value=pad_value, impl="shift_vjp"))))(x)
  want = _np_max_pool_grad_first_max(np.asarray(x), np.asarray(ct), stride, pad_value)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_max_pool_vjp_propagates_nan():
  x = np.array(_x((1, 5, 5, 2)))
  x[0, 2, 2, 1] = np.nan
  y = layers.max_pool(jnp.asarray(x), 3, stride=1, padding=1, impl="shift_vjp")
  assert np.isnan(np.asarray(y)[0, 1:4, 1:4, 1]).all()
  assert np.isfinite(np.asarray(y)[..., 0]).all()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (2, 8, 8, 3)])
def test_avg_pool_shift_vjp_equals_reduce_window(stride, count_include_pad, shape):
  x = _x(shape)
  kw = dict(stride=stride, padding=1, count_include_pad=count_include_pad)
  ref = lambda a: layers.avg_pool(a, 3, impl="lax", **kw)
  fast = lambda a: layers.avg_pool(a, 3, impl="shift_vjp", **kw)
  np.testing.assert_allclose(jax.jit(fast)(x), jax.jit(ref)(x), rtol=1e-6, atol=1e-6)
  ct = _x(ref(x).shape, seed=3)
  g_fast = jax.jit(jax.grad(lambda a: jnp.sum(ct * fast(a))))(x)
  g_ref = jax.jit(jax.grad(lambda a: jnp.sum(ct * ref(a))))(x)
  np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6, atol=1e-6)


def test_batchnorm_matches_flax_and_pytorch_running_update():
  x = _x((4, 5, 5, 6)) * 3 + 1
  bn = ops_lib.BatchNorm(True)
  v = bn.init(jax.random.key(0), x, train=True)
  assert jax.tree_util.tree_map(jnp.shape, v) == {
      "params": {"scale": (6,), "bias": (6,)}, "batch_stats": {"mean": (6,), "var": (6,)}}
  params = {"scale": _x((6,), 1) + 1, "bias": _x((6,), 2)}
  y, st = bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                   mutable=["batch_stats"])
  ref = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
  rv = ref.init(jax.random.key(0), x)
  y_ref = ref.apply({"params": params, "batch_stats": rv["batch_stats"]}, x,
                    mutable=["batch_stats"])[0]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  xn = np.asarray(x, np.float64).reshape(-1, 6)
  np.testing.assert_allclose(st["batch_stats"]["mean"], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(st["batch_stats"]["var"], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)
  # Eval mode uses the running statistics.
  y_eval = bn.apply({"params": params, "batch_stats": st["batch_stats"]}, x, train=False)
  m, var = st["batch_stats"]["mean"], st["batch_stats"]["var"]
  np.testing.assert_allclose(y_eval, (x - m) / np.sqrt(var + 1e-5) * params["scale"]
                             + params["bias"], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown op"):
    ops_lib.get_op("darts", "sep3", 8, 1)
  with pytest.raises(ValueError, match="unknown op family"):
    ops_lib.get_op("nasnet", "sep3", 8, 1)
  with pytest.raises(ValueError, match="depthwise kernel"):
    layers.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 4)))
  with pytest.raises(ValueError, match="even channel"):
    m = ops_lib.get_op("darts", "factorized_reduce", 5, 2)
    m.init(jax.random.key(0), jnp.zeros((1, 4, 4, 5)), train=True)
