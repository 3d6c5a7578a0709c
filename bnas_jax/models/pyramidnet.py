"""The additive bottleneck PyramidNet with tree cells (proxyless spec sections 1-3, 5.3, 5.5).

Layout (spec 1.1-1.3): stem 3 x 3 conv 3 -> 16 (no bias) + BN; three stages of N bottleneck blocks
(the first block of stages 2 and 3 has stride 2); head BN -> ReLU -> global average pool -> Linear.
Block k (input D_k channels, bottleneck width C_k from `pyramid_widths`, stride s):

  shortcut = x (s = 1) or 2 x 2 / stride 2 average pool (s = 2), zero-padded to 4 C_k channels
  residual = BN(D_k) -> 1 x 1 conv D_k -> C_k (no ReLU) -> cell(C_k, s)
             -> BN -> ReLU -> 1 x 1 conv C_k -> 4 C_k -> BN(4 C_k)
  output   = shortcut + residual

The cell is a `bnas_jax.search_space.tree.TreeCell` given as data (`TreeCellNet`), the same cell in
every block with the block's width and stride; `tree.PLAIN_CELL` is the plain PyramidNet (one grouped
3 x 3 conv). The primitive layers (spec 1.4) put BN -> ReLU before each conv ("bn_act_weight"):

* ``gconv_3x3``: BN -> ReLU -> 3 x 3 conv, groups G, the block stride, padding 1 (root edges);
* ``conv_1x1``: BN -> ReLU -> 1 x 1 conv;
* ``sep_kxk``: BN -> ReLU -> depthwise k x k -> pointwise 1 x 1 (once, no BN between);
* ``max_pool_3x3`` (padding -inf), ``avg_pool_3x3`` (padding excluded from the divisor),
  ``identity``: stride 1, no parameters.

Convs are initialised "he_fout" (spec 5.3): normal, std sqrt(2 / (k * k * C_out / groups)); BN
scale 1 / bias 0; the classifier weight U(+-1/sqrt(fan_in)) and bias 0. DropPath (spec 2.6): in
training, every branch of every node draws one uniform number per step (shared by the batch):
with probability p its output is zero, else it is scaled by 1 / (1 - p).

Parameter counts (BN scale/bias included, running statistics not) reproduce spec 1.6 and 3:
TreeCell-A with N = 18, alpha = 84, G = 2 has 5,724,330 parameters (tests/test_proxyless.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from bnas_jax.models import layers
from bnas_jax.models import ops as ops_lib
from bnas_jax.search_space import tree as tree_lib

Array = jax.Array
START_CHANNELS = 16  # stem width (spec 1.1, start_planes)
EXPANSION = 4  # block output = 4 C (spec 1.2)


def pyramid_widths(num_blocks: int, alpha: float, groups: int = 2,
                   start: int = START_CHANNELS) -> tuple[int, ...]:
  """Bottleneck widths C_1..C_{3N} of the additive PyramidNet (spec 1.2).

  ``p <- p + alpha / (3N)`` from p = `start`; ``C = round(p)`` (Python rounding, ties to even),
  then lowered to a multiple of `groups`.

  Args:
    num_blocks: N, blocks per stage (>= 1).
    alpha: total widening (>= 0).
    groups: G of the grouped 3 x 3 conv (>= 1).
    start: the stem width.

  Raises:
    ValueError: N < 1, alpha < 0 or groups < 1, or a width that rounds to 0.
  """
  if int(num_blocks) < 1 or float(alpha) < 0 or int(groups) < 1:
    raise ValueError(f"PyramidNet needs num_blocks >= 1, alpha >= 0 and groups >= 1; got "
                     f"num_blocks={num_blocks}, alpha={alpha}, groups={groups}")
  n = 3 * int(num_blocks)
  step, p, out = float(alpha) / n, float(start), []
  for _ in range(n):
    p += step
    c = int(round(p))
    c -= c % int(groups)
    if c < 1:
      raise ValueError(f"PyramidNet width {c} < 1 (start={start}, groups={groups})")
    out.append(c)
  return tuple(out)


def block_strides(num_blocks: int) -> tuple[int, ...]:
  """Stride of each of the 3N blocks: 2 for the first block of stages 2 and 3."""
  n = int(num_blocks)
  return tuple(2 if k in (n, 2 * n) else 1 for k in range(3 * n))


def he_fout(kernel: int, out_channels: int, groups: int = 1):
  """Normal init with std sqrt(2 / (k * k * C_out / groups)) (spec 5.3, "he_fout")."""
  std = float(np.sqrt(2.0 / (kernel * kernel * out_channels / groups)))
  return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


class Conv(nn.Module):
  """k x k conv without bias, stride s, padding (k - 1) / 2 on every side, `groups` groups.

  Kernel ``f32[k, k, C_in / groups, features]``; input f32[B, H, W, C_in].
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c_in = x.shape[-1]
    if c_in % self.groups or self.features % self.groups:
      raise ValueError(f"Conv: {c_in} -> {self.features} channels are not divisible by "
                       f"groups={self.groups}")
    w = self.param("kernel", he_fout(self.kernel, self.features, self.groups),
                   (self.kernel, self.kernel, c_in // self.groups, self.features))
    if self.groups == 1:
      return layers.conv(x, w, stride=self.stride, padding=(self.kernel - 1) // 2)
    pad = (self.kernel - 1) // 2
    return lax.conv_general_dilated(x, w, (self.stride, self.stride), [(pad, pad)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=self.groups)


class EdgeOp(nn.Module):
  """One edge op ``C_in -> features`` (module docstring; spec 1.4).

  Attributes:
    op: `tree.ROOT_OP` or one of `tree.EDGE_OPS`.
    features: output channels (parameter-free ops need C_in == features).
    stride: 1, or the block stride on root edges.
    groups: groups of `tree.ROOT_OP` (other ops: dense / depthwise).
    dw_impl: depthwise / pooling implementation (`layers.depthwise_conv`).
    search_bn: append a non-affine BN (the supernet's candidate ops, spec 4.3.4).
  """
  op: str
  features: int
  stride: int = 1
  groups: int = 1
  dw_impl: str = "shift"
  search_bn: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    op, c_in = self.op, x.shape[-1]
    if op in ("identity", "max_pool_3x3", "avg_pool_3x3"):
      if c_in != self.features or self.stride != 1:
        raise ValueError(f"{op} maps {c_in} -> {c_in} channels at stride 1; asked for "
                         f"{self.features} channels at stride {self.stride}")
      pool_impl = self.dw_impl if self.dw_impl == "shift_vjp" else "shift"
      if op == "identity":
        y = x
      elif op == "max_pool_3x3":
        y = layers.max_pool(x, 3, stride=1, padding=1, impl=pool_impl)
      else:
        y = layers.avg_pool(x, 3, stride=1, padding=1, count_include_pad=False, impl=pool_impl)
    else:
      h = nn.relu(ops_lib.BatchNorm(True, name="bn")(x, train=train))
      if op == tree_lib.ROOT_OP:
        y = Conv(self.features, 3, self.stride, self.groups, name="conv")(h)
      elif op == "conv_1x1":
        y = Conv(self.features, 1, self.stride, name="conv")(h)
      elif op.startswith("sep_"):
        k = int(op[4])
        dw = self.param("depthwise", he_fout(k, c_in, c_in), (k, k, c_in))
        h = layers.depthwise_conv(h, dw, stride=self.stride, padding=(k - 1) // 2,
                                  impl=self.dw_impl)
        y = Conv(self.features, 1, name="pointwise")(h)
      else:
        raise ValueError(f"unknown tree-cell op {op!r}; use {tree_lib.ROOT_OP!r} or one of "
                         f"{tree_lib.EDGE_OPS}")
    if self.search_bn:
      y = ops_lib.BatchNorm(False, name="search_bn")(y, train=train)
    return y


def drop_branch(y: Array, drop_prob, key: Array) -> Array:
  """DropPath of one branch (spec 2.6): one draw for the whole batch; zero with probability p,
  else ``y / (1 - p)``. `drop_prob` may be traced."""
  p = jnp.asarray(drop_prob, y.dtype)
  keep = (jax.random.uniform(key, (), y.dtype) >= p).astype(y.dtype)
  return y * keep / (1.0 - p)


class TreeCellNet(nn.Module):
  """A tree cell of width `channels` (spec 2.2): f32[B, H, W, C] -> f32[B, H/s, W/s, C].

  Attributes:
    cell: the `tree.TreeCell`.
    channels: C (the block's bottleneck width).
    stride: the block stride (carried by the root edges).
    groups: G of the root edges (a split root divides it by its branch count, spec 2.3).
    dw_impl: see `EdgeOp`.
  """
  cell: tree_lib.TreeCell
  channels: int
  stride: int = 1
  groups: int = 2
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, *, train: bool, drop_prob=None) -> Array:
    if x.shape[-1] != self.channels:
      raise ValueError(f"TreeCellNet: input has {x.shape[-1]} channels, expected {self.channels}")
    drop = train and drop_prob is not None

    def apply_node(n: tree_lib.TreeNode, x: Array, path: str, depth: int) -> Array:
      w, b = x.shape[-1], len(n.branches)
      sizes = tree_lib.split_sizes(w, b)
      starts = np.cumsum((0,) + sizes)
      outs = []
      for i, br in enumerate(n.branches):
        p = f"{path}{i + 1}"
        xi = x[..., starts[i]:starts[i + 1]] if n.allocation == "split" else x
        c_out = sizes[i] if n.merge == "concat" else w
        root = depth == 0
        groups = max(self.groups // b, 1) if (root and n.allocation == "split") else self.groups
        y = None
        for op in br.ops:
          yo = EdgeOp(op, c_out, self.stride if root else 1, groups if root else 1, self.dw_impl,
                      name=f"{p}_{op}")(xi, train=train)
          y = yo if y is None else y + yo
        if br.child is not None:
          y = apply_node(br.child, y, p, depth + 1)
        if drop:
          y = drop_branch(y, drop_prob, self.make_rng("dropout"))
        outs.append(y)
      if n.merge == "concat":
        return jnp.concatenate(outs, axis=-1)
      return outs[0] if n.merge == "none" else sum(outs[1:], outs[0]) / float(b)

    return apply_node(self.cell.root, x, "R", 0)


def shortcut(x: Array, stride: int, out_channels: int) -> Array:
  """Identity or 2 x 2 / stride 2 average pool (VALID), then zero channels appended (spec 1.3)."""
  if stride == 2:
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  pad = out_channels - x.shape[-1]
  if pad < 0:
    raise ValueError(f"block output {out_channels} channels < input {x.shape[-1]}")
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) if pad else x


class Bottleneck(nn.Module):
  """One PyramidNet block (module docstring) around the cell built by `cell_factory`.

  Attributes:
    channels: C_k.
    stride: 1 or 2.
    cell_factory: ``(channels=, stride=, name=) -> nn.Module`` whose call is
      ``cell(x, train=..., **cell_kwargs)``.
  """
  channels: int
  stride: int
  cell_factory: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array, *, train: bool, **cell_kwargs) -> Array:
    c = self.channels
    r = ops_lib.BatchNorm(True, name="in_bn")(x, train=train)
    r = Conv(c, 1, name="in_conv")(r)
    r = self.cell_factory(channels=c, stride=self.stride, name="cell")(r, train=train,
                                                                       **cell_kwargs)
    r = nn.relu(ops_lib.BatchNorm(True, name="out_bn")(r, train=train))
    r = Conv(EXPANSION * c, 1, name="out_conv")(r)
    r = ops_lib.BatchNorm(True, name="final_bn")(r, train=train)
    return shortcut(x, self.stride, EXPANSION * c) + r


def backbone(images: Array, widths: Sequence[int], cell_factory: Callable[..., nn.Module],
             cell_kwargs: Callable[[int], dict], *, train: bool, num_classes: int,
             start_channels: int = START_CHANNELS) -> Array:
  """The PyramidNet forward pass (call inside a compact method): logits f32[B, num_classes].

  Args:
    images: f32[B, H, W, C].
    widths: C_k per block (`pyramid_widths`); 3N entries.
    cell_factory: see `Bottleneck`.
    cell_kwargs: block index -> extra keyword arguments of that block's cell call.
  """
  n = len(widths) // 3
  x = Conv(start_channels, 3, name="stem_conv")(images)
  x = ops_lib.BatchNorm(True, name="stem_bn")(x, train=train)
  for k, (c, s) in enumerate(zip(widths, block_strides(n))):
    x = Bottleneck(c, s, cell_factory, name=f"block_{k}")(x, train=train, **cell_kwargs(k))
  x = nn.relu(ops_lib.BatchNorm(True, name="head_bn")(x, train=train))
  x = layers.global_avg_pool(x)
  return nn.Dense(num_classes, kernel_init=layers.torch_uniform(x.shape[-1]),
                  bias_init=nn.initializers.zeros, name="classifier")(x)


class PyramidNet(nn.Module):
  """PyramidNet with a tree cell in every block (the retraining network of the proxyless search).

  Attributes:
    cell: a `tree.TreeCell` (e.g. `tree.TREE_CELL_A`, `tree.PLAIN_CELL`, a derived cell).
    num_blocks: N, blocks per stage (3N blocks).
    alpha: widening (spec 1.2).
    groups: G.
    num_classes: classifier outputs.
    start_channels: stem width.
    dw_impl: depthwise / pooling implementation (`layers.resolve_dw_impl` names).

  Call: ``model.apply(variables, images, train=..., drop_prob=...)`` -> ``(logits, None)`` (the
  second output is the absent auxiliary head, as `bnas_jax.train_eval` expects); DropPath needs
  the ``'dropout'`` rng when `train` and `drop_prob` is not None.
  """
  cell: tree_lib.TreeCell
  num_blocks: int
  alpha: float
  groups: int = 2
  num_classes: int = 10
  start_channels: int = START_CHANNELS
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, images: Array, *, train: bool, drop_prob=None):
    widths = pyramid_widths(self.num_blocks, self.alpha, self.groups, self.start_channels)
    factory = functools.partial(TreeCellNet, cell=self.cell, groups=self.groups,
                                dw_impl=self.dw_impl)
    logits = backbone(images, widths, factory, lambda k: {"drop_prob": drop_prob}, train=train,
                      num_classes=self.num_classes, start_channels=self.start_channels)
    return logits, None


def create_pyramidnet(cell: Any, num_blocks: int, alpha: float, groups: int = 2,
                      num_classes: int = 10, dw_impl: str = "auto") -> PyramidNet:
  """`PyramidNet` of `cell` (a `TreeCell`, a registered name or a tree-cell JSON path).

  Raises:
    ValueError: an unknown cell, bad widths (`pyramid_widths`) or an unknown `dw_impl`.
  """
  cell = tree_lib.load_tree_cell(cell)
  pyramid_widths(num_blocks, alpha, groups)  # validates
  return PyramidNet(cell, int(num_blocks), float(alpha), int(groups), int(num_classes or 10),
                    dw_impl=layers.resolve_dw_impl(dw_impl))


def count_params(model: nn.Module, image_shape: Sequence[int] = (32, 32, 3)) -> int:
  """Parameters of `model` from `jax.eval_shape` of its init (nothing allocated or compiled)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda k, im: model.init({"params": k}, im, train=False),
                          jax.random.key(0), x)["params"]
  return int(sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes)))
