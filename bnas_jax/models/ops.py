"""Candidate operations of the three search spaces, as flax.linen modules (NHWC).

One registry ``OPS[family][name]`` of factories ``(channels, stride, options, name) -> nn.Module``
(`OpOptions`: the network's BN affinity and conv implementations), looked up through `get_op`; the
module is called as ``m(x, train=...)`` with ``x: f32[B, H, W, C_in]`` and returns ``f32[B, H', W', C]``
(``H' = ceil(H / stride)`` for the 32/16/8 CIFAR sizes).

Families:

* ``'bayesnas'`` (spec 2.1, the official BayesNAS ``search/OneShot.py``): BN-ReLU-Conv order, no bias
  anywhere, no BN after the last conv. ``sep3``/``sep5``, ``dil3``/``dil5`` (a FULL k x k conv with
  dilation 2, then 1 x 1), ``max`` (zero padding), ``avg`` (zero padding counted), ``ident``
  (stride 2: BN + 1 x 1 stride-2 conv), and the preprocessing block ``creduct`` (spec 2.3).
* ``'darts'`` (``quark0/darts`` ``operations.py``): ReLU-Conv-BN ops, ``none`` (Zero),
  ``avg_pool_3x3`` (``count_include_pad=False``), ``max_pool_3x3``, ``skip_connect`` (identity, or
  FactorizedReduce at stride 2), ``sep_conv_{3x3,5x5}``, ``dil_conv_{3x3,5x5}``; helpers
  ``relu_conv_bn`` and ``factorized_reduce``. ``OpOptions.affine`` (default True, as in the evaluation
  networks; the DARTS search network uses False).
* ``'nb201'`` (NAS-Bench-201 / AutoDL ``cell_operations.py``): ``none``, ``skip_connect``,
  ``nor_conv_1x1``, ``nor_conv_3x3`` (ReLU-Conv-BN; AutoDL gives the conv a bias iff ``affine`` is
  False), ``avg_pool_3x3`` (``count_include_pad=False``), ``factorized_reduce``, ``relu_conv_bn``
  and the ResNet basic block between stages (``resnet_basic_block``).

Every op is the plain single op of the reference code (parameter counts identical: conv =
out x in x k x k, depthwise conv = C x k x k, BN = 2C if affine). The supernet stacks the
parameters of the edges of a cell along a leading edge axis itself (`bnas_jax.models.supernet`).
Batch norm uses batch statistics when ``train=True`` (running averages are updated only when the
``'batch_stats'`` collection is mutable) and the running averages otherwise; PyTorch defaults
(momentum 0.1, eps 1e-5, unbiased running variance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnas_jax.models import layers
# The building blocks (`bnas_jax.models.blocks`) are part of this module's API too.
from bnas_jax.models.blocks import BatchNorm, Conv, DepthwiseConv, PointwiseConv

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Parameter-free ops.


class Identity(nn.Module):
  """Returns its input."""

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    return x


class Zero(nn.Module):
  """DARTS/AutoDL ``Zero``: zeros of the (strided) input shape."""
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    return jnp.zeros_like(x[:, ::self.stride, ::self.stride, :])


class Pool(nn.Module):
  """3 x 3 max or average pooling, padding 1.

  Attributes:
    kind: ``'max'`` or ``'avg'``.
    stride: 1 or 2.
    zero_pad_max: pad with zeros before a max pool (BayesNAS, spec 2.1) instead of -inf.
    count_include_pad: average over 9 (True: PyTorch default, BayesNAS) or over the real pixels.
    impl: the depthwise impl of the network (`layers.max_pool`, `layers.avg_pool`:
      ``'shift_vjp'`` gives both pools a custom VJP, reverse mode only).
  """
  kind: str
  stride: int = 1
  zero_pad_max: bool = False
  count_include_pad: bool = False
  impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    del train
    if self.kind == "max":
      return layers.max_pool(x, 3, stride=self.stride, padding=1,
                             pad_value=0.0 if self.zero_pad_max else -jnp.inf, impl=self.impl)
    if self.kind == "avg":
      return layers.avg_pool(x, 3, stride=self.stride, padding=1,
                             count_include_pad=self.count_include_pad, impl=self.impl)
    raise ValueError(f"Pool.kind must be 'max' or 'avg', got {self.kind!r}")


# ------------------------------------------------------------------------------------------------
# BayesNAS ops (spec 2.1, 2.3): BN-ReLU-Conv, no bias, no trailing BN.


class BSepConv(nn.Module):
  """BayesNAS ``sep_k``: twice [BN, ReLU, depthwise k x k (stride on rep 1), 1 x 1 conv C->C]."""
  channels: int
  kernel_size: int
  stride: int = 1
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    k = self.kernel_size
    for r in range(2):
      x = BatchNorm(True, name=f"bn{r}")(x, train=train)
      x = nn.relu(x)
      x = DepthwiseConv(k, self.stride if r == 0 else 1, k // 2, 1, self.dw_impl,
                        name=f"dw{r}")(x)
      x = PointwiseConv(self.channels, 1, False, name=f"pw{r}")(x)
    return x


class BDilConv(nn.Module):
  """BayesNAS ``dil_k``: BN, ReLU, FULL k x k conv with dilation 2 and stride s, then 1 x 1 conv."""
  channels: int
  kernel_size: int
  stride: int = 1
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    k = self.kernel_size
    x = nn.relu(BatchNorm(True, name="bn")(x, train=train))
    x = Conv(self.channels, k, self.stride, k - 1, 2, False, self.conv_impl, name="conv")(x)
    return PointwiseConv(self.channels, 1, False, name="pw")(x)


class BIdent(nn.Module):
  """BayesNAS ``ident``: identity at stride 1; BN + 1 x 1 stride-2 conv (no ReLU) at stride 2."""
  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.stride == 1:
      return x
    x = BatchNorm(True, name="bn")(x, train=train)
    return PointwiseConv(self.channels, self.stride, False, name="pw")(x)


class CReduct(nn.Module):
  """BayesNAS preprocessing block (spec 2.3).

  ``[optional 1 x 1 stride-2 conv C_in->C_in, no BN] -> BN -> ReLU -> 1 x 1 conv C_in->channels``.
  The optional conv (``reduce_input=True``) is used on the k-2 input when the previous cell was a
  reduction cell (that input has twice the spatial size).
  """
  channels: int
  reduce_input: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.reduce_input:
      x = PointwiseConv(x.shape[-1], 2, name="reduce")(x)
    x = nn.relu(BatchNorm(True, name="bn")(x, train=train))
    return PointwiseConv(self.channels, name="pw")(x)


# ------------------------------------------------------------------------------------------------
# DARTS / NAS-Bench-201 ops: ReLU-Conv-BN.


class ReLUConvBN(nn.Module):
  """ReLU -> k x k conv (C_in -> channels) -> BN.

  Attributes:
    use_bias: conv bias (DARTS: False; AutoDL/NAS-Bench-201: ``not affine``).
  """
  channels: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  affine: bool = True
  use_bias: bool = False
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = nn.relu(x)
    x = Conv(self.channels, self.kernel_size, self.stride, self.padding, 1, self.use_bias,
             self.conv_impl, name="conv")(x)
    return BatchNorm(self.affine, name="bn")(x, train=train)


class DilConv(nn.Module):
  """DARTS ``DilConv``: ReLU, depthwise k x k (dilation d, stride s), 1 x 1 conv, BN."""
  channels: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  affine: bool = True
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = nn.relu(x)
    x = DepthwiseConv(self.kernel_size, self.stride, self.padding, self.dilation, self.dw_impl,
                      name="dw")(x)
    x = PointwiseConv(self.channels, 1, False, name="pw")(x)
    return BatchNorm(self.affine, name="bn")(x, train=train)


class SepConv(nn.Module):
  """DARTS ``SepConv``: [ReLU, depthwise (stride s), 1 x 1, BN] then [ReLU, depthwise, 1 x 1, BN]."""
  channels: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  affine: bool = True
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    for r, (stride, c_out) in enumerate(((self.stride, x.shape[-1]), (1, self.channels))):
      x = nn.relu(x)
      x = DepthwiseConv(self.kernel_size, stride, self.padding, 1, self.dw_impl,
                        name=f"dw{r}")(x)
      x = PointwiseConv(c_out, 1, False, name=f"pw{r}")(x)
      x = BatchNorm(self.affine, name=f"bn{r}")(x, train=train)
    return x


class FactorizedReduce(nn.Module):
  """ReLU, two 1 x 1 stride-2 convs (on x and on x shifted by one pixel), concat, BN.

  Attributes:
    style: ``'darts'`` (``quark0/darts``: C//2 + C//2 channels, requires an even `channels`, the
      shifted branch reads ``x[:, 1:, 1:]``) or ``'nb201'`` (AutoDL: C//2 + (C - C//2) channels,
      the shifted branch reads the zero-padded ``x[:, 1:, 1:]``, conv bias iff ``use_bias``).
  """
  channels: int
  affine: bool = True
  style: str = "darts"
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.style == "darts":
      if self.channels % 2:
        raise ValueError(f"DARTS FactorizedReduce needs an even channel count, got {self.channels}")
      c1, c2 = self.channels // 2, self.channels // 2
      shifted = x[:, 1:, 1:, :]
    elif self.style == "nb201":
      c1, c2 = self.channels // 2, self.channels - self.channels // 2
      shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:, :]
    else:
      raise ValueError(f"FactorizedReduce.style must be 'darts' or 'nb201', got {self.style!r}")
    x = nn.relu(x)
    shifted = nn.relu(shifted)
    a = PointwiseConv(c1, 2, self.use_bias, name="conv_1")(x)
    b = PointwiseConv(c2, 2, self.use_bias, name="conv_2")(shifted)
    return BatchNorm(self.affine, name="bn")(jnp.concatenate([a, b], axis=-1), train=train)


class ResNetBasicBlock(nn.Module):
  """NAS-Bench-201 ``ResNetBasicblock`` (between stages, stride 2).

  ``ReLUConvBN(3x3, stride) -> ReLUConvBN(3x3)`` plus a residual: at stride 2 an AvgPool(2, 2) and
  a 1 x 1 conv without bias; at stride 1 with a channel change a ReLUConvBN 1 x 1; else identity.
  """
  channels: int
  stride: int = 2
  affine: bool = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.stride not in (1, 2):
      raise ValueError(f"ResNetBasicBlock stride must be 1 or 2, got {self.stride}")
    nb = not self.affine
    y = ReLUConvBN(self.channels, 3, self.stride, 1, self.affine, nb, name="conv_a")(x, train=train)
    y = ReLUConvBN(self.channels, 3, 1, 1, self.affine, nb, name="conv_b")(y, train=train)
    if self.stride == 2:
      r = layers.avg_pool(x, 2, stride=2, padding=0)
      r = PointwiseConv(self.channels, name="downsample")(r)
    elif x.shape[-1] != self.channels:
      r = ReLUConvBN(self.channels, 1, 1, 0, self.affine, nb, name="downsample")(x, train=train)
    else:
      r = x
    return r + y


# ------------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class OpOptions:
  """Build options a network passes to every candidate op; each op reads only those it has.

  Attributes:
    affine: learnable BN scale and bias in the DARTS / NAS-Bench-201 ops (their search networks use
      False, the evaluation networks True); the BayesNAS ops have no such option.
    dw_impl: depthwise-conv and pool implementation (`bnas_jax.models.layers.depthwise_conv`).
    conv_impl: dense k x k conv implementation (`bnas_jax.models.layers.conv`) of the ops in
      `DENSE_CONV_OPS`.
  """
  affine: bool = True
  dw_impl: str = "shift"
  conv_impl: str = "lax"


# A factory builds one op: ``factory(channels, stride, options, name) -> nn.Module``.
OpFactory = Callable[[int, int, OpOptions, Optional[str]], nn.Module]


def _zero(channels, stride, options, name):
  del channels, options
  return Zero(stride, name=name)


def _pool(kind, channels, stride, options, name, **pool_kw):
  """3 x 3 pool; the network's depthwise impl also picks the pool impl (see `Pool.impl`)."""
  del channels
  return Pool(kind, stride, impl=options.dw_impl, name=name, **pool_kw)


def _bayes_sep(k, channels, stride, options, name):
  return BSepConv(channels, k, stride, options.dw_impl, name=name)


def _bayes_dil(k, channels, stride, options, name):
  return BDilConv(channels, k, stride, options.conv_impl, name=name)


def _bayes_ident(channels, stride, options, name):
  del options
  return BIdent(channels, stride, name=name)


def _creduct(channels, stride, options, name):
  del options  # stride 2 = with the 1 x 1 stride-2 conv on the input (spec 2.3)
  return CReduct(channels, reduce_input=(stride == 2), name=name)


def _skip(style, channels, stride, options, name):
  """Identity at stride 1, else the style's FactorizedReduce (AutoDL: conv bias iff not affine)."""
  if stride == 1:
    return Identity(name=name)
  return FactorizedReduce(channels, options.affine, style,
                          style == "nb201" and not options.affine, name=name)


def _factorized_reduce(style, channels, stride, options, name):
  del stride  # always stride 2
  return FactorizedReduce(channels, options.affine, style,
                          style == "nb201" and not options.affine, name=name)


def _relu_conv_bn(k, padding, bias_if_not_affine, channels, stride, options, name):
  return ReLUConvBN(channels, k, stride, padding, options.affine,
                    bias_if_not_affine and not options.affine, options.conv_impl, name=name)


def _darts_sep(k, padding, channels, stride, options, name):
  return SepConv(channels, k, stride, padding, options.affine, options.dw_impl, name=name)


def _darts_dil(k, padding, channels, stride, options, name):
  return DilConv(channels, k, stride, padding, 2, options.affine, options.dw_impl, name=name)


def _resnet_block(channels, stride, options, name):
  return ResNetBasicBlock(channels, stride, options.affine, name=name)


P = functools.partial

# Candidate ops with a dense k x k convolution: they use ``OpOptions.conv_impl``
# (`layers.conv`; on CPU the supernet's edge loop picks 'im2col' or 'lax_vjp': `supernet.Cell`).
DENSE_CONV_OPS = {"bayesnas": ("dil3", "dil5"), "nb201": ("nor_conv_3x3",)}

OPS: dict[str, dict[str, OpFactory]] = {
    "bayesnas": {
        "sep3": P(_bayes_sep, 3),
        "sep5": P(_bayes_sep, 5),
        "dil3": P(_bayes_dil, 3),
        "dil5": P(_bayes_dil, 5),
        "max": P(_pool, "max", zero_pad_max=True),
        "avg": P(_pool, "avg", count_include_pad=True),
        "ident": _bayes_ident,
        "creduct": _creduct,
    },
    "darts": {
        "none": _zero,
        "avg_pool_3x3": P(_pool, "avg", count_include_pad=False),
        "max_pool_3x3": P(_pool, "max"),
        "skip_connect": P(_skip, "darts"),
        "sep_conv_3x3": P(_darts_sep, 3, 1),
        "sep_conv_5x5": P(_darts_sep, 5, 2),
        "dil_conv_3x3": P(_darts_dil, 3, 2),
        "dil_conv_5x5": P(_darts_dil, 5, 4),
        # Helpers: the DARTS preprocessing 1 x 1 ReLUConvBN and FactorizedReduce.
        "relu_conv_bn": P(_relu_conv_bn, 1, 0, False),
        "factorized_reduce": P(_factorized_reduce, "darts"),
    },
    "nb201": {
        "none": _zero,
        "skip_connect": P(_skip, "nb201"),
        "nor_conv_1x1": P(_relu_conv_bn, 1, 0, True),
        "nor_conv_3x3": P(_relu_conv_bn, 3, 1, True),
        "avg_pool_3x3": P(_pool, "avg", count_include_pad=False),
        "relu_conv_bn": P(_relu_conv_bn, 1, 0, True),
        "factorized_reduce": P(_factorized_reduce, "nb201"),
        "resnet_basic_block": _resnet_block,
    },
}


def get_op(family: str, name: str, channels: int, stride: int,
           options: OpOptions = OpOptions(), *, module_name: Optional[str] = None) -> nn.Module:
  """The op ``OPS[family][name]`` with `channels` outputs and `stride`: the one op lookup of the
  supernet and the evaluation networks.

  Args:
    family: op family (``'bayesnas'``, ``'darts'``, ``'nb201'``).
    name: op name within the family.
    channels: output channels.
    stride: 1 or 2.
    options: the network's build options (`OpOptions`).
    module_name: the flax module name (default: flax's automatic name).

  Raises:
    ValueError: unknown family or op name (the message lists the known ones), or a stride other
      than 1 or 2.
  """
  if family not in OPS:
    raise ValueError(f"unknown op family {family!r}; choose one of {sorted(OPS)}")
  if name not in OPS[family]:
    raise ValueError(f"unknown op {name!r} in family {family!r}; choose one of "
                     f"{sorted(OPS[family])}")
  if stride not in (1, 2):
    raise ValueError(f"stride must be 1 or 2, got {stride}")
  return OPS[family][name](channels, stride, options, module_name)
