"""Evaluation (retraining) networks built from a discrete genotype, in flax.linen.

Two flavours, picked by the genotype's op family (``genotype.space``):

* ``darts`` (DARTS ``model.py``; spec 7.3, reference_numbers.md "DARTS-format genotypes"): ReLU-Conv-BN
  ops with affine BN, cell inputs preprocessed by ReLUConvBN 1x1 (or FactorizedReduce on c_{k-2}
  after a reduction), CIFAR stem 3x3 conv to 3C + BN, global average pool + Linear head, auxiliary
  head on the output of cell ``2 * num_cells // 3``, drop path on every non-identity op.
* ``bayesnas`` (official ``CNN/pre_trained/<lambda>/OneShot.py``, spec 2.1, 2.3, 7.3, 8.3): an edge
  may keep several ops, which are summed into the target node; BN-ReLU-Conv ops; every cell input
  goes through CReduct (BN-ReLU-1x1 conv), c_{k-2} first through a 1x1 stride-2 conv when it has
  twice the resolution of c_{k-1} (``prev_reduce='conv'``) or through a factorised reduce (two 1x1
  stride-2 convs C_in -> C_in/2, the second on the input shifted by one pixel; ``'factorized'``, the
  released lambda = 0.005 model); stem 3x3 conv without BN; head BN -> global avg pool -> Linear (no
  ReLU); channel dropout (``dropout2d``) on every op output.

Macro structure shared by both (DARTS ``NetworkCIFAR`` / ``NetworkImageNet``): cells ``0..L-1`` with
reduction cells at ``L // 3`` and ``2 L // 3`` (channels doubled there), so CIFAR L = 20 is
6 N, R, 6 N, R, 6 N and ImageNet L = 14 is 4 N, R, 4 N, R, 4 N. ImageNet uses the DARTS ImageNet stem
(two stride-2 convs to 56x56 feed c_{k-2}, one more stride-2 conv feeds c_{k-1} at 28x28).

The candidate ops come from the shared registry `bnas_jax.models.ops.OPS[family][name]` (`ops.get_op`), so
search and evaluation use one definition. Eval-only pieces (stems, cell-input preprocessing, heads,
drop path, channel dropout) live here.

Calling convention::

  model = create_eval_net('darts_v2')                      # or a Genotype / JSON path
  variables = model.init({'params': key}, images, train=False)
  logits, aux = model.apply(variables, images, train=True, drop_prob=0.1,
                            rngs={'dropout': key}, mutable=['batch_stats'])[0]

``images`` are ``f32[B, H, W, C]`` (NHWC); ``logits`` ``f32[B, num_classes]``; ``aux`` is the auxiliary
head's ``f32[B, num_classes]`` in train mode and ``None`` in eval mode (or without an aux head).
Eval mode (``train=False``) uses BN running statistics and no dropout/drop path: it is deterministic.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax import genotype as genotype_lib
from bnas_jax.models import layers
from bnas_jax.models import ops as ops_lib

# Released BayesNAS models whose c_{k-2} preprocessing after a reduction is the factorised reduce
# (CNN/pre_trained/0.005/OneShot.py, CReduct(size_reduct=True)); all others use one 1x1 stride-2 conv.
RELEASED_PREV_REDUCE = {"bayesnas_0.005": "factorized"}

# Default macro settings per dataset (spec 7.3, 7.4; DARTS train.py / train_imagenet.py).
DATASET_DEFAULTS = {
    "cifar10": dict(num_classes=10, init_channels=36, num_cells=20, stem="cifar", image_size=32),
    "cifar100": dict(num_classes=100, init_channels=36, num_cells=20, stem="cifar", image_size=32),
    "imagenet": dict(num_classes=1000, init_channels=48, num_cells=14, stem="imagenet",
                     image_size=224),
}


def _batch_norm(train: bool, name: str | None = None):
  """Affine BN with the shared op semantics (PyTorch momentum/eps, `ops.BatchNorm`); call on x."""
  bn = ops_lib.BatchNorm(True, name=name)
  return lambda x: bn(x, train=train)


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0,
          name: str | None = None) -> nn.Module:
  """k x k conv without bias (`ops.Conv`: PyTorch padding and init)."""
  return ops_lib.Conv(features, kernel, stride, padding, name=name)


class Linear(nn.Module):
  """``torch.nn.Linear`` equivalent: weights and bias ~ U(+-1/sqrt(fan_in)). f32[B,D] -> f32[B,F]."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    k = self.param("kernel", layers.torch_uniform(fan_in), (fan_in, self.features))
    b = self.param("bias", layers.torch_uniform(fan_in), (self.features,))
    return x @ k + b


# --------------------------------------------------------------------------------------------------
# Regularisers: drop path (DARTS) and channel dropout (BayesNAS dropout2d).


def drop_path(x: jax.Array, drop_prob: jax.Array | float, key: jax.Array) -> jax.Array:
  """DARTS drop path: zeroes each example's whole tensor with probability `drop_prob`.

  Args:
    x: f32[B, H, W, C].
    drop_prob: scalar in [0, 1); survivors are scaled by 1 / (1 - drop_prob).
    key: PRNG key.

  Returns:
    f32[B, H, W, C]; equal to `x` when drop_prob == 0.
  """
  keep = 1.0 - jnp.asarray(drop_prob, x.dtype)
  mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, 1)).astype(x.dtype)
  return x * mask / keep


def channel_dropout(x: jax.Array, drop_prob: jax.Array | float, key: jax.Array) -> jax.Array:
  """BayesNAS channel dropout (``F.dropout2d``): zeroes whole channels per example.

  Args:
    x: f32[B, H, W, C].
    drop_prob: scalar in [0, 1); survivors are scaled by 1 / (1 - drop_prob).
    key: PRNG key.

  Returns:
    f32[B, H, W, C]; equal to `x` when drop_prob == 0.
  """
  keep = 1.0 - jnp.asarray(drop_prob, x.dtype)
  mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, x.shape[-1])).astype(x.dtype)
  return x * mask / keep


# --------------------------------------------------------------------------------------------------
# Cell-input preprocessing.


class FactorizedCReduct(nn.Module):
  """CReduct of the released lambda = 0.005 model (``CReduct(size_reduct=True)`` there).

  Two 1x1 stride-2 convs C_in -> C_in // 2 (the second on the input shifted by one pixel),
  concatenated, then BN -> ReLU -> 1x1 conv C_in -> channels. f32[B,H,W,C_in] -> f32[B,H/2,W/2,C].

  Raises:
    ValueError: if C_in is odd.
  """
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c_in = x.shape[-1]
    if c_in % 2:
      raise ValueError(f"FactorizedCReduct needs an even input channel count, got {c_in}")
    a = ops_lib.PointwiseConv(c_in // 2, 2, name="reduce")(x)
    b = ops_lib.PointwiseConv(c_in // 2, 2, name="reduce_2")(x[:, 1:, 1:, :])
    x = jnp.concatenate([a, b], axis=-1)
    x = nn.relu(ops_lib.BatchNorm(True, name="bn")(x, train=train))
    return ops_lib.PointwiseConv(self.channels, name="pw")(x)


def _preprocess(family: str, channels: int, reduce: bool, prev_reduce: str,
                name: str) -> nn.Module:
  """Cell-input preprocessing: DARTS ReLUConvBN 1x1 / FactorizedReduce (shared ops), BayesNAS
  CReduct (shared op; its 1x1 stride-2 conv when `reduce`) or `FactorizedCReduct`."""
  if family == "darts":
    op = "factorized_reduce" if reduce else "relu_conv_bn"
    return ops_lib.get_op("darts", op, channels, 2 if reduce else 1, module_name=name)
  if reduce and prev_reduce == "factorized":
    return FactorizedCReduct(channels, name=name)
  return ops_lib.get_op("bayesnas", "creduct", channels, 2 if reduce else 1, module_name=name)


# --------------------------------------------------------------------------------------------------
# Cells.


class _Edge(nn.Module):
  """One (source -> target, op) edge of a cell: the op plus its drop path / channel dropout."""
  family: str
  op: str
  channels: int
  stride: int
  drop_mode: str  # 'path' | 'channel' | 'none'
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x, *, train: bool, drop_prob):
    y = ops_lib.get_op(self.family, self.op, self.channels, self.stride,
                       ops_lib.OpOptions(dw_impl=self.dw_impl))(x, train=train)
    is_identity = self.op in ("skip_connect", "ident") and self.stride == 1
    if train and drop_prob is not None and self.drop_mode != "none":
      if self.drop_mode == "path" and not is_identity:  # DARTS: identity is never dropped
        y = drop_path(y, drop_prob, self.make_rng("dropout"))
      elif self.drop_mode == "channel":  # BayesNAS: dropout2d on every op output
        y = channel_dropout(y, drop_prob, self.make_rng("dropout"))
    return y


class Cell(nn.Module):
  """A discrete cell: nodes 2..5 are sums of their incoming ops; output = concat of `concat` nodes.

  Attributes:
    edges: triples (target, source, op) with node ids 0 = c_{k-2}, 1 = c_{k-1}, 2.. intermediates.
    concat: node ids concatenated (channel axis) into the cell output.
    family: op family ('darts' or 'bayesnas').
    channels: C, channels of every node.
    reduction: whether ops leaving nodes 0/1 have stride 2.
    prev_reduce: how c_{k-2} is brought to c_{k-1}'s resolution when it is twice as large
      ('darts' flavour: always FactorizedReduce; bayesnas: 'conv' or 'factorized').
    drop_mode: 'path' (DARTS), 'channel' (BayesNAS) or 'none'.
    dw_impl: depthwise implementation of the separable / dilated convs
      (`bnas_jax.models.layers.depthwise_conv`).
  """
  edges: tuple[tuple[int, int, str], ...]
  concat: tuple[int, ...]
  family: str
  channels: int
  reduction: bool
  prev_reduce: str = "conv"
  drop_mode: str = "path"
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, s0, s1, *, train: bool, drop_prob=None):
    """Args: s0 f32[B,H0,W0,*] (c_{k-2}), s1 f32[B,H,W,*] (c_{k-1}). Returns f32[B,H',W',|concat| C]."""
    needs_reduce = s0.shape[1] != s1.shape[1]
    if needs_reduce and s0.shape[1] != 2 * s1.shape[1]:
      raise ValueError(f"cell inputs of incompatible resolutions {s0.shape} and {s1.shape}")
    c = self.channels
    s0 = _preprocess(self.family, c, needs_reduce, self.prev_reduce, "preprocess0")(s0, train=train)
    s1 = _preprocess(self.family, c, False, self.prev_reduce, "preprocess1")(s1, train=train)
    states = {0: s0, 1: s1}
    for target in sorted({t for t, _, _ in self.edges}):
      total = None
      for t, source, op in self.edges:
        if t != target:
          continue
        if source not in states:
          raise ValueError(f"edge ({t}, {source}, {op!r}) reads node {source} before it is computed")
        stride = 2 if (self.reduction and source < 2) else 1
        y = _Edge(self.family, op, c, stride, self.drop_mode, self.dw_impl,
                  name=f"edge_{t}_{source}_{op}")(
            states[source], train=train, drop_prob=drop_prob)
        total = y if total is None else total + y
      states[target] = total
    missing = [n for n in self.concat if n not in states]
    if missing:
      raise ValueError(f"cell output concatenates nodes {missing} that have no incoming op")
    return jnp.concatenate([states[n] for n in self.concat], axis=-1)


# --------------------------------------------------------------------------------------------------
# Heads.


class AuxiliaryHeadCIFAR(nn.Module):
  """DARTS CIFAR auxiliary head on an 8x8 map: ReLU, avgpool 5/3, 1x1 conv 128 + BN, ReLU,
  2x2 conv 768 + BN, ReLU, Linear. f32[B,8,8,C] -> f32[B,num_classes]."""
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.avg_pool(nn.relu(x), 5, stride=3, padding=0)
    x = nn.relu(_batch_norm(train)(_conv(128, 1)(x)))
    x = nn.relu(_batch_norm(train)(_conv(768, 2)(x)))
    return Linear(self.num_classes)(x.reshape(x.shape[0], -1))


class AuxiliaryHeadImageNet(nn.Module):
  """DARTS ImageNet auxiliary head (7x7 map): ReLU, avgpool 5/2, 1x1 conv 128 + BN, ReLU,
  2x2 conv 768 (no BN, as DARTS' published runs), ReLU, Linear."""
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.avg_pool(nn.relu(x), 5, stride=2, padding=0)
    x = nn.relu(_batch_norm(train)(_conv(128, 1)(x)))
    x = nn.relu(_conv(768, 2)(x))
    return Linear(self.num_classes)(x.reshape(x.shape[0], -1))


# --------------------------------------------------------------------------------------------------
# Network.


class EvalNetwork(nn.Module):
  """Evaluation network stacked from a genotype's cells (see the module docstring).

  Attributes:
    genotype: the discrete architecture (`bnas_jax.genotype.Genotype`).
    num_classes: classifier outputs.
    init_channels: C of the first cells (36 CIFAR, 48 ImageNet).
    num_cells: L, total cells; reductions at L // 3 and 2 L // 3.
    stem: 'cifar' (3x3 conv to 3C, 32x32) or 'imagenet' (DARTS ImageNet stem, 224x224).
    auxiliary: whether to build the auxiliary head on cell 2 L // 3's output.
    prev_reduce: BayesNAS flavour only: 'conv' or 'factorized' (see `CReduct`).
    drop_mode: 'path', 'channel' or 'none'; None = the flavour's default (darts: 'path',
      bayesnas: 'channel').
    dw_impl: depthwise implementation (`bnas_jax.models.layers.depthwise_conv`; the same
      function for every choice).
  """
  genotype: Any
  num_classes: int = 10
  init_channels: int = 36
  num_cells: int = 20
  stem: str = "cifar"
  auxiliary: bool = True
  prev_reduce: str = "conv"
  drop_mode: str | None = None
  dw_impl: str = "shift"

  @property
  def family(self) -> str:
    """Op family of the genotype ('darts' or 'bayesnas').

    Raises:
      ValueError: for other spaces (NAS-Bench-201 cells are looked up in its table, not trained).
    """
    if self.genotype.space not in ("darts", "bayesnas"):
      raise ValueError(f"evaluation networks exist for 'darts' and 'bayesnas' genotypes, not "
                       f"{self.genotype.space!r}")
    return self.genotype.space

  def reduction_indices(self) -> tuple[int, int]:
    return (self.num_cells // 3, 2 * self.num_cells // 3)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, drop_prob=None):
    """Forward pass.

    Args:
      images: f32[B, H, W, C] normalised images (32x32x3 CIFAR, 224x224x3 ImageNet; any size
        with sides divisible by 4 and any channel count with the CIFAR stem).
      train: batch statistics + drop path/dropout (needs the 'dropout' rng when drop_prob is
        given) if True; running statistics and no randomness if False.
      drop_prob: scalar drop-path / channel-dropout probability (may be a traced value, so a
        per-epoch schedule does not recompile); None or train=False disables it.

    Returns:
      (logits f32[B, num_classes], aux_logits f32[B, num_classes] or None); aux_logits is only
      computed in train mode.
    """
    if images.ndim != 4 or images.shape[1] % 4 or images.shape[2] % 4:
      raise ValueError(f"images must be f32[B, H, W, C] (NHWC) with H and W divisible by 4 (two "
                       f"reductions), got shape {images.shape}")
    family = self.family
    drop_mode = self.drop_mode or ("path" if family == "darts" else "channel")
    c = self.init_channels
    if self.stem == "cifar":
      s0 = _conv(3 * c, 3, 1, 1, name="stem_conv")(images)
      if family == "darts":
        s0 = _batch_norm(train, name="stem_bn")(s0)
      s1 = s0
    elif self.stem == "imagenet":
      x = _conv(c // 2, 3, 2, 1, name="stem0_conv0")(images)
      x = nn.relu(_batch_norm(train, name="stem0_bn0")(x))
      x = _conv(c, 3, 2, 1, name="stem0_conv1")(x)
      s0 = _batch_norm(train, name="stem0_bn1")(x)
      s1 = _conv(c, 3, 2, 1, name="stem1_conv")(nn.relu(s0))
      if family == "darts":
        s1 = _batch_norm(train, name="stem1_bn")(s1)
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")

    aux_logits = None
    reductions = self.reduction_indices()
    for i in range(self.num_cells):
      reduction = i in reductions
      if reduction:
        c *= 2
      g = self.genotype
      cell = Cell(edges=tuple(g.reduce if reduction else g.normal),
                  concat=tuple(g.reduce_concat if reduction else g.normal_concat),
                  family=family, channels=c, reduction=reduction, prev_reduce=self.prev_reduce,
                  drop_mode=drop_mode, dw_impl=self.dw_impl, name=f"cell_{i}")
      s0, s1 = s1, cell(s0, s1, train=train, drop_prob=drop_prob)
      if self.auxiliary and i == reductions[1] and (train or self.is_initializing()):
        head = AuxiliaryHeadCIFAR if self.stem == "cifar" else AuxiliaryHeadImageNet
        aux_logits = head(self.num_classes, name="auxiliary_head")(s1, train=train)
    x = s1
    if family == "bayesnas":
      x = _batch_norm(train, name="final_bn")(x)
    x = jnp.mean(x, axis=(1, 2))
    logits = Linear(self.num_classes, name="classifier")(x)
    return logits, (aux_logits if train else None)


# --------------------------------------------------------------------------------------------------
# Builders.


def resolve_genotype(genotype) -> tuple[Any, str | None]:
  """Returns (Genotype, registered name or None) for a Genotype, a registered name or a JSON path.

  Raises:
    ValueError: if `genotype` is neither (message from `bnas_jax.genotype`).
  """
  if isinstance(genotype, str):
    name = genotype if not os.path.exists(genotype) else None
    return genotype_lib.load_genotype(genotype), name
  return genotype, None


def create_eval_net(genotype, *, dataset: str = "cifar10", num_classes: int | None = None,
                    init_channels: int | None = None, num_cells: int | None = None,
                    auxiliary: bool = True, prev_reduce: str = "auto",
                    drop_mode: str | None = None, dw_impl: str = "auto") -> EvalNetwork:
  """Builds the evaluation network for `genotype` in the setting of `dataset`.

  Args:
    genotype: a `Genotype`, a registered name (``darts_v2``, ``bayesnas_0.01``, ...) or a JSON path.
    dataset: 'cifar10', 'cifar100' or 'imagenet' (sets the defaults of the remaining arguments).
    num_classes, init_channels, num_cells: override the dataset defaults.
    auxiliary: build the auxiliary head (DARTS protocol; it is not counted in "params").
    prev_reduce: 'auto' (the released model's choice: 'factorized' for bayesnas_0.005, else
      'conv'), 'conv' or 'factorized'. Only used by the BayesNAS flavour.
    drop_mode: None (flavour default), 'path', 'channel' or 'none'.
    dw_impl: depthwise implementation; 'auto' (`layers.resolve_dw_impl`) is the fastest training
      step for the default backend ('shift_vjp' on CPU, 'lax' on GPU/TPU).

  Returns:
    An unbound `EvalNetwork`.

  Raises:
    ValueError: on an unknown dataset / prev_reduce / drop_mode / dw_impl, or a genotype of
      another space than darts / bayesnas.
  """
  if dataset not in DATASET_DEFAULTS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}")
  d = DATASET_DEFAULTS[dataset]
  geno, name = resolve_genotype(genotype)
  if geno.space not in ("darts", "bayesnas"):
    raise ValueError(f"genotype {name or genotype!r} is a {geno.space!r} cell; evaluation networks "
                     "are built for 'darts' and 'bayesnas' genotypes only (score NAS-Bench-201 cells "
                     "with bnas_jax.nb201 table look-ups instead)")
  geno.check_buildable()  # an empty cell (every op pruned) has no channels
  if prev_reduce == "auto":
    prev_reduce = RELEASED_PREV_REDUCE.get(name or "", "conv")
  if prev_reduce not in ("conv", "factorized"):
    raise ValueError(f"prev_reduce must be 'auto', 'conv' or 'factorized', got {prev_reduce!r}")
  if drop_mode not in (None, "path", "channel", "none"):
    raise ValueError(f"drop_mode must be None, 'path', 'channel' or 'none', got {drop_mode!r}")
  return EvalNetwork(
      genotype=geno,
      num_classes=num_classes or d["num_classes"],
      init_channels=init_channels or d["init_channels"],
      num_cells=num_cells or d["num_cells"],
      stem=d["stem"], auxiliary=auxiliary, prev_reduce=prev_reduce, drop_mode=drop_mode,
      dw_impl=layers.resolve_dw_impl(dw_impl))


def image_size_for(model: EvalNetwork) -> int:
  """Input resolution the model's stem is built for (32 CIFAR, 224 ImageNet)."""
  return 32 if model.stem == "cifar" else 224


def image_shape_of(image_size: int | Sequence[int]) -> tuple[int, int, int]:
  """``(H, W, C)`` of ``image_size``: a side (square RGB images) or ``(H, W, C)`` itself."""
  if isinstance(image_size, (int, np.integer)):
    return (int(image_size), int(image_size), 3)
  return tuple(int(d) for d in image_size)


def abstract_variables(model: EvalNetwork, batch_size: int = 1,
                       image_size: int | Sequence[int] | None = None) -> dict:
  """Shapes of the model's variables via `jax.eval_shape` (nothing is allocated or compiled).

  ``image_size``: the side of square RGB images, or ``(H, W, C)``; None = `image_size_for`.
  """
  x = jax.ShapeDtypeStruct((batch_size, *image_shape_of(image_size or image_size_for(model))),
                           jnp.float32)
  return jax.eval_shape(lambda k, im: model.init({"params": k}, im, train=False),
                        jax.random.key(0), x)


def count_params(params) -> int:
  """Number of scalars in a (possibly abstract) parameter pytree."""
  return int(sum(int(jnp.size(p)) if not hasattr(p, "shape") else int(_prod(p.shape))
                 for p in jax.tree_util.tree_leaves(params)))


def _prod(shape: Sequence[int]) -> int:
  out = 1
  for s in shape:
    out *= int(s)
  return out


def param_counts(model: EvalNetwork,
                 image_size: int | Sequence[int] | None = None) -> dict[str, int]:
  """Parameter counts in the DARTS convention, via `jax.eval_shape` (no compile).

  ``image_size`` as in `abstract_variables` (the auxiliary head's size depends on it).

  Returns:
    {'params': without the auxiliary head (the reported number), 'aux_params': the auxiliary
    head, 'total': both}. BN scale/bias count, running statistics do not.
  """
  params = abstract_variables(model, image_size=image_size)["params"]
  aux = count_params(params.get("auxiliary_head", {}))
  total = count_params(params)
  return {"params": total - aux, "aux_params": aux, "total": total}
