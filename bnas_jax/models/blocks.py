"""Building blocks of the candidate ops and the networks: batch norm with PyTorch conventions and
the 1 x 1, dense k x k and depthwise convolutions on `bnas_jax.models.layers` (NHWC, no bias unless
asked)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnas_jax.models import layers

Array = jax.Array

BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-5


class BatchNorm(nn.Module):
  """Batch norm over ``f32[B, H, W, C]``; parameters and running statistics ``f32[C]``.

  Attributes:
    affine: learnable scale and bias (PyTorch ``affine``).
  """
  affine: bool = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      mean, var = layers.batch_norm_stats(x)
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        count = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var * (count / max(count - 1, 1))
        ra_mean.value = (1 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
        ra_var.value = (1 - BN_MOMENTUM) * ra_var.value + BN_MOMENTUM * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = jax.lax.rsqrt(var + BN_EPS)
    if self.affine:
      mul = mul * self.param("scale", nn.initializers.ones, (c,))
    y = (x - mean) * mul
    if self.affine:
      y = y + self.param("bias", nn.initializers.zeros, (c,))
    return y


def _init_shortcut(fn, *args) -> Array:
  """During ``init`` only shapes matter: zeros of fn's output shape keep the init graph tiny."""
  out = jax.eval_shape(fn, *args)
  return jnp.zeros(out.shape, out.dtype)


class PointwiseConv(nn.Module):
  """1 x 1 convolution ``C_in -> features`` (optionally strided, optional bias); kernel
  ``f32[C_in, features]``."""
  features: int
  stride: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ci = x.shape[-1]
    k = self.param("kernel", layers.torch_uniform(ci), (ci, self.features))
    fn = lambda a, b: jnp.dot(a[:, ::self.stride, ::self.stride, :], b)
    y = _init_shortcut(fn, x, k) if self.is_initializing() else fn(x, k)
    if self.use_bias:
      y = y + self.param("bias", layers.torch_uniform(ci), (self.features,))
    return y


class Conv(nn.Module):
  """Dense k x k convolution ``C_in -> features`` (PyTorch padding semantics); kernel
  ``f32[k, k, C_in, features]`` (HWIO). A 1 x 1 kernel without padding is a `PointwiseConv`
  named ``pw``."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  impl: str = "lax"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kernel_size == 1 and self.padding == 0:
      return PointwiseConv(self.features, self.stride, self.use_bias, name="pw")(x)
    ci = x.shape[-1]
    k = self.kernel_size
    w = self.param("kernel", layers.torch_uniform(ci * k * k), (k, k, ci, self.features))
    fn = lambda a, b: layers.conv(a, b, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, impl=self.impl)
    y = _init_shortcut(fn, x, w) if self.is_initializing() else fn(x, w)
    if self.use_bias:
      y = y + self.param("bias", layers.torch_uniform(ci * k * k), (self.features,))
    return y


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution (``groups=C``, no bias); kernel ``f32[k, k, C]``.

  Attributes:
    impl: ``'shift_vjp'`` (fastest to train on CPU; reverse-mode AD only), ``'shift'``,
      ``'scan'``, ``'patches'`` or ``'lax'`` (``feature_group_count``), see
      `bnas_jax.models.layers.depthwise_conv`.
  """
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    w = self.param("kernel", layers.torch_uniform(k * k), (k, k, x.shape[-1]))
    fn = lambda a, b: layers.depthwise_conv(a, b, stride=self.stride, padding=self.padding,
                                            dilation=self.dilation, impl=self.impl)
    return _init_shortcut(fn, x, w) if self.is_initializing() else fn(x, w)
