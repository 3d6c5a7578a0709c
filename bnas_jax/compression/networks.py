"""The reference networks of network compression, with optional unit switches, and their counts.

One Flax module, `CompressNet`, covers every network of compression spec section 1: a stack of
convolutions (optional batch norm, ReLU, 2 x 2 max- or average-pool, dropout), a flatten, then
fully connected layers. An `Arch` (static, hashable) gives the widths, so a pruned and exported
network (compression spec 2.4) is the same module with smaller widths and, for the first FC layer,
the kept input indices (``input_index``).

Layout (Flax): a conv kernel is ``f32[kh, kw, C_in, C_out]``, an FC kernel ``f32[in, out]``,
activations NHWC. The flatten is NHWC, so flattened unit ``k`` has channel ``k mod C`` and position
``k // C`` (spec 2.1). Parameter names: ``conv{i}`` and ``fc{j}`` (1-based) with ``kernel`` /
``bias``; batch norms ``bn_conv{i}`` / ``bn_fc{j}`` (``scale``, ``bias``; running ``mean``, ``var``
in ``batch_stats``).

Unit switches (spec 2.2): ``__call__`` takes ``unit_switches = {name: f32[U] or f32[B, U]}`` (see
`bnas_jax.compression.groups` for the grouped form the HARD prior works on):

* ``'conv{i}'`` / ``'fc{j}'``: output switch of a conv channel / hidden FC neuron, multiplying the
  affine output after bias and batch norm, before the nonlinearity: ``y_c = act(s_c A_c(x))``;
  s_c = 0 deletes the unit exactly (ReLU(0) = 0, pooling and flatten of zeros are zeros);
* ``'fc1_in'``: input switch of the first FC layer's inputs (raw pixels of an MLP, the flattened
  conv units of LeNet-5): ``x_i <- r_i x_i`` before the matmul.

A leading batch axis ``[B, U]`` scales example b by its own copy (per-example switch copies, as
`bnas_jax.curvature.ggn_fast` needs).

Counting convention (spec 1, 4.3, 4.5): "weights" = conv kernels + FC matrices; "params" = weights
+ biases + batch-norm scale and offset (running statistics never counted); MACs = multiply-adds of
conv and FC layers at batch 1 (biases, BN, activations, pooling excluded), conv MACs =
``kh kw K_{l-1} K_l H_out W_out``, FC MACs = ``in_kept out_kept``. `count` computes them from the
widths alone; tests check them against the parameter tree and the spec 8 oracles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3  # Lasagne / TensorFlow default of the SBP and Sparse VD VGG-like (spec 1.3)


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """One conv layer: ``features`` filters of ``kernel x kernel``, stride 1.

  Attributes:
    features: output channels.
    kernel: kernel height = width.
    padding: ``'VALID'`` or ``'SAME'``.
    pool: ``None``, ``'max'`` or ``'avg'``: a 2 x 2 / 2 pool after the nonlinearity.
    dropout: drop probability after the layer (pretraining only; 0 = none).
  """
  features: int
  kernel: int = 3
  padding: str = "SAME"
  pool: str | None = None
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Arch:
  """A network of compression spec section 1 (hashable: a static argument of jitted functions).

  Attributes:
    name: label (``'lenet300_100'``, ``'lenet5'``, ``'vgg_like'``, ...).
    input_shape: ``(H, W, C)`` of one image.
    convs: the conv layers, in order.
    dense: hidden FC widths (the logits layer of ``num_classes`` follows).
    num_classes: logits.
    conv_bias: conv layers have a bias.
    batch_norm: batch norm after every conv and hidden FC layer (before the switch).
    conv_relu: ReLU after the convs (False: the Caffe-exact LeNet-5, ReLU only after ``fc1``).
    input_index: kept indices into the flattened features feeding ``fc1`` (an exported network);
      None = all.
    fc_in_dropout: dropout before ``fc1`` (pretraining only).
    fc_dropout: dropout after each hidden FC ReLU (pretraining only).
  """
  name: str
  input_shape: tuple[int, int, int]
  convs: tuple[ConvLayer, ...]
  dense: tuple[int, ...]
  num_classes: int = 10
  conv_bias: bool = True
  batch_norm: bool = False
  conv_relu: bool = True
  input_index: tuple[int, ...] | None = None
  fc_in_dropout: float = 0.0
  fc_dropout: float = 0.0

  def conv_output_shapes(self) -> list[tuple[int, int, int]]:
    """``(H_out, W_out, C_out)`` of each conv (before its pool)."""
    h, w, _ = self.input_shape
    out = []
    for layer in self.convs:
      if layer.padding == "VALID":
        h, w = h - layer.kernel + 1, w - layer.kernel + 1
      out.append((h, w, layer.features))
      if layer.pool:
        h, w = h // 2, w // 2
    return out

  def flatten_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the map that is flattened into ``fc1`` (the input itself for an MLP)."""
    h, w, c = self.input_shape
    for layer, (ho, wo, co) in zip(self.convs, self.conv_output_shapes()):
      h, w, c = (ho // 2, wo // 2, co) if layer.pool else (ho, wo, co)
    return h, w, c

  @property
  def flatten_size(self) -> int:
    return int(np.prod(self.flatten_shape()))

  @property
  def fc_in(self) -> int:
    """Inputs of ``fc1`` (after ``input_index``)."""
    return self.flatten_size if self.input_index is None else len(self.input_index)

  def replace(self, **kwargs) -> "Arch":
    return dataclasses.replace(self, **kwargs)


def _check_arch(arch: Arch) -> None:
  if len(arch.input_shape) != 3 or min(arch.input_shape) < 1:
    raise ValueError(f"Arch.input_shape must be (H, W, C) with positive sizes, got "
                     f"{arch.input_shape}")
  for i, layer in enumerate(arch.convs, 1):
    if layer.features < 1 or layer.padding not in ("VALID", "SAME") or layer.pool not in (
        None, "max", "avg"):
      raise ValueError(f"{arch.name} conv{i}: features must be >= 1, padding 'VALID'/'SAME' and "
                       f"pool None/'max'/'avg'; got {layer}")
  for (h, w, _) in arch.conv_output_shapes():
    if h < 1 or w < 1:
      raise ValueError(f"{arch.name}: input {arch.input_shape} is too small for its convs "
                       f"(a conv output of {h} x {w})")
  if any(d < 1 for d in arch.dense):
    raise ValueError(f"{arch.name}: every hidden FC width must be >= 1, got {arch.dense} (a "
                     "layer with no unit left cannot be exported; lower the sparsity strength)")
  if arch.input_index is not None:
    idx = np.asarray(arch.input_index)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= arch.flatten_size:
      raise ValueError(f"{arch.name}: input_index must be non-empty indices into the "
                       f"{arch.flatten_size} flattened features")


# -------------------------------------------------------------------------------------------------
# The reference networks (compression spec 1).


def lenet300_100(num_classes: int = 10) -> Arch:
  """LeNet-300-100: 784 -> 300 -> 100 -> 10, ReLU (spec 1.1); 266,610 params."""
  return Arch("lenet300_100", (28, 28, 1), (), (300, 100), num_classes)


def lenet500_300(num_classes: int = 10) -> Arch:
  """LeNet-500-300 (SBP's "Lenet-fc", spec 1.1b); 545,810 params."""
  return Arch("lenet500_300", (28, 28, 1), (), (500, 300), num_classes)


def lenet5(num_classes: int = 10, *, padding: str = "VALID", caffe_exact: bool = False,
           widths: Sequence[int] = (20, 50, 500)) -> Arch:
  """LeNet-5-Caffe (spec 1.2): conv5x5(20) - pool - conv5x5(50) - pool - fc 500 - fc 10.

  Args:
    num_classes: logits.
    padding: ``'VALID'`` (431,080 params, the reported experiments) or ``'SAME'`` (1,256,080, the
      released SBP script).
    caffe_exact: no ReLU after the convs (the Caffe prototxt); default: ReLU after each conv.
    widths: ``(conv1, conv2, fc1)`` widths.
  """
  c1, c2, f1 = widths
  return Arch("lenet5", (28, 28, 1),
              (ConvLayer(c1, 5, padding, "max"), ConvLayer(c2, 5, padding, "max")),
              (f1,), num_classes, conv_relu=not caffe_exact)


VGG_LIKE_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG_POOL_AFTER = (1, 3, 6, 9, 12)  # 0-based conv index followed by a max-pool
_VGG_DROPOUT = {0: 0.3, 2: 0.4, 4: 0.4, 5: 0.4, 7: 0.4, 8: 0.4}  # SBP vgglike.py (spec 1.3)


def vgg_like(num_classes: int = 10, *, scale: float = 1.0, widths: Sequence[int] | None = None,
             fc_width: int | None = None, conv_bias: bool = True, dropout: bool = True) -> Arch:
  """The VGG-like CIFAR-10 network of SBP / Sparse VD / BC (spec 1.3).

  13 conv 3x3 SAME (+ bias) + BN + ReLU, max-pools after conv 2, 4, 7, 10, 13 (32 -> 1), then
  FC 512 -> 512 + BN + ReLU -> FC 10. Dropout as SBP's pretraining net when `dropout`.
  At scale 1: 14,991,946 params (14,987,722 without conv bias), 313,463,808 MACs.

  Args:
    num_classes: logits.
    scale: width multiplier (rounded, at least 1 per layer); ignored when `widths` is given.
    widths: the 13 conv widths (default `VGG_LIKE_WIDTHS` times `scale`).
    fc_width: hidden FC width (default the last conv width).
    conv_bias: conv layers have a bias (Li et al.'s VGG-16 has none).
    dropout: SBP's pretraining dropout.

  Raises:
    ValueError: not 13 widths, or a non-positive scale.
  """
  if widths is None:
    if not scale > 0:
      raise ValueError(f"scale must be > 0, got {scale}")
    widths = tuple(max(1, int(round(w * scale))) for w in VGG_LIKE_WIDTHS)
  widths = tuple(int(w) for w in widths)
  if len(widths) != 13:
    raise ValueError(f"vgg_like needs 13 conv widths, got {len(widths)}: {widths}")
  convs = tuple(
      ConvLayer(w, 3, "SAME", "max" if i in _VGG_POOL_AFTER else None,
                _VGG_DROPOUT.get(i, 0.0) if dropout else 0.0) for i, w in enumerate(widths))
  return Arch("vgg_like", (32, 32, 3), convs, (fc_width or widths[-1],), num_classes,
              conv_bias=conv_bias, batch_norm=True, fc_in_dropout=0.5 if dropout else 0.0,
              fc_dropout=0.5 if dropout else 0.0)


NETWORKS = {"lenet300_100": lenet300_100, "lenet500_300": lenet500_300, "lenet5": lenet5,
            "vgg_like": vgg_like}


def get_arch(name: str, **kwargs) -> Arch:
  """The network `name` of `NETWORKS` (keyword options passed on).

  Raises:
    ValueError: naming the unknown network and the known ones.
  """
  if name not in NETWORKS:
    raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
  arch = NETWORKS[name](**kwargs)
  _check_arch(arch)
  return arch


# -------------------------------------------------------------------------------------------------
# The module.


def _scale(x: Array, s: Array | None) -> Array:
  """``x[B, ..., U] * s`` for ``s`` f32[U] (shared) or f32[B, U] (per example)."""
  if s is None:
    return x
  s = jnp.asarray(s, x.dtype)
  if s.ndim == 2:
    s = s.reshape((s.shape[0],) + (1,) * (x.ndim - 2) + (s.shape[1],))
  return x * s


class CompressNet(nn.Module):
  """The network of `arch`: ``(f32[B, H, W, C] images, unit_switches) -> f32[B, num_classes]``.

  Attributes:
    arch: the `Arch`.
  """
  arch: Arch

  @nn.compact
  def __call__(self, x: Array, unit_switches: Mapping[str, Array] | None = None, *,
               train: bool = False, train_bn: bool | None = None) -> Array:
    """Logits f32[B, num_classes].

    Args:
      x: f32[B, H, W, C] normalised images.
      unit_switches: optional ``{name: f32[U] | f32[B, U]}`` (module docstring); missing = 1.
      train: dropout on (needs the ``'dropout'`` rng).
      train_bn: batch norm with batch statistics (updates ``batch_stats``); default `train`.
        False: running statistics (the compression stage freezes batch norm, spec 1.3).
    """
    a = self.arch
    sw = dict(unit_switches or {})
    train_bn = train if train_bn is None else train_bn
    for i, layer in enumerate(a.convs, 1):
      x = nn.Conv(layer.features, (layer.kernel, layer.kernel), padding=layer.padding,
                  use_bias=a.conv_bias, name=f"conv{i}")(x)
      if a.batch_norm:
        x = nn.BatchNorm(use_running_average=not train_bn, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name=f"bn_conv{i}")(x)
      x = _scale(x, sw.get(f"conv{i}"))
      if a.conv_relu:
        x = nn.relu(x)
      if layer.pool == "max":
        x = nn.max_pool(x, (2, 2), (2, 2))
      elif layer.pool == "avg":
        x = nn.avg_pool(x, (2, 2), (2, 2))
      if layer.dropout:
        x = nn.Dropout(layer.dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    if a.input_index is not None:
      x = x[:, np.asarray(a.input_index)]
    x = _scale(x, sw.get("fc1_in"))
    if a.fc_in_dropout:
      x = nn.Dropout(a.fc_in_dropout, deterministic=not train)(x)
    for j, width in enumerate(a.dense, 1):
      x = nn.Dense(width, name=f"fc{j}")(x)
      if a.batch_norm:
        x = nn.BatchNorm(use_running_average=not train_bn, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name=f"bn_fc{j}")(x)
      x = nn.relu(_scale(x, sw.get(f"fc{j}")))
      if a.fc_dropout:
        x = nn.Dropout(a.fc_dropout, deterministic=not train)(x)
    return nn.Dense(a.num_classes, name=f"fc{len(a.dense) + 1}")(x)


def init_variables(arch: Arch, key: Array) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` (no batch_stats without batch norm), f32.

  Raises:
    ValueError: a malformed `arch` (see `get_arch`).
  """
  _check_arch(arch)
  x = jnp.zeros((1,) + tuple(arch.input_shape), jnp.float32)
  variables = CompressNet(arch).init({"params": key}, x)
  return {k: v for k, v in dict(variables).items()}


# -------------------------------------------------------------------------------------------------
# Counting (spec 1, 4.3, 4.5).


def count(arch: Arch) -> dict[str, int]:
  """``{'weights', 'params', 'macs'}`` of `arch` from its widths alone (module docstring).

  Raises:
    ValueError: a malformed `arch`.
  """
  _check_arch(arch)
  weights = params = macs = 0
  c_in = arch.input_shape[2]
  for layer, (ho, wo, co) in zip(arch.convs, arch.conv_output_shapes()):
    w = layer.kernel * layer.kernel * c_in * co
    weights += w
    macs += w * ho * wo
    params += w + (co if arch.conv_bias else 0) + (2 * co if arch.batch_norm else 0)
    c_in = co
  fan_in = arch.fc_in
  for j, width in enumerate(arch.dense + (arch.num_classes,)):
    w = fan_in * width
    hidden = j < len(arch.dense)
    weights += w
    macs += w
    params += w + width + (2 * width if arch.batch_norm and hidden else 0)
    fan_in = width
  return {"weights": int(weights), "params": int(params), "macs": int(macs)}


def count_tree(variables: Mapping[str, Any]) -> dict[str, int]:
  """``{'weights', 'params'}`` counted on a parameter tree (``kernel`` leaves are weights;
  ``batch_stats`` are not counted)."""
  params = variables["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  weights = sum(int(np.size(v)) for p, v in flat if getattr(p[-1], "key", None) == "kernel")
  return {"weights": weights, "params": sum(int(np.size(v)) for _, v in flat)}


def structure(arch: Arch) -> str:
  """The kept structure in the anchors' notation (spec 4.2), e.g. ``'20-50-800-500'``.

  Conv widths, then the inputs of ``fc1``, then the hidden FC widths; for an MLP the logits count
  too (``'784-300-100-10'``, as SBP writes it).
  """
  parts = [layer.features for layer in arch.convs] + [arch.fc_in] + list(arch.dense)
  if not arch.convs:
    parts.append(arch.num_classes)
  return "-".join(str(int(p)) for p in parts)
