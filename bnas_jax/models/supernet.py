"""The one-shot supernet of each search space (flax.linen), with switches passed in as an argument.

Macro structures:

* ``'bayesnas'`` (spec 2.4, official ``search/OneShot.py``): stem 3 x 3 conv 3 -> 3C (no BN, no bias);
  `num_cells` cells with reductions at ``num_cells // 3`` and ``2 * num_cells // 3`` (channels double
  there); each cell input passes a CReduct block (spec 2.3; the k-2 input after a reduction also gets
  the 1 x 1 stride-2 conv); 8-edge cells (spec 2.2) whose output concatenates nodes 2..5 (4C);
  head BN -> ReLU -> global average pool -> Linear. The official search net is 8 cells, C = 36
  (cell channels 36, 36, 72, 72, 72, 144, 144, 144): 26,910,838 weights, 512 switches.
* ``'darts'`` (``quark0/darts`` ``model_search.py``): stem 3 x 3 conv to 3C + BN; ReLUConvBN (or
  FactorizedReduce after a reduction) preprocessing with ``affine=False``; 14-edge cells; pools
  followed by BN(affine=False) as in the DARTS search ``MixedOp``; global average pool + Linear.
* ``'nb201'`` (AutoDL ``TinyNetworkDarts``-style): 3 x 3 stem conv to C + BN; 3 stages of
  `num_cells` cells with C, 2C, 4C channels; a residual basic block (stride 2, affine BN) between
  stages; 6-edge cells (``affine=False`` ops), cell output = node 3; BN -> ReLU -> GAP -> Linear.

Edge output = sum_op s_op * op(s_origin * x) (spec 2.1), a node is the sum of its edges. Switches
are ``{tau: f32[n_tau, E, 1 + n_ops]}`` (cell c of type tau uses ``switches[tau][c]``), or with a
leading per-example axis ``{tau: f32[B, n_tau, E, 1 + n_ops]}`` (example b is scaled by its own
copy). The static ``alive`` mask (``spaces.freeze_mask``) removes pruned ops and dead edges from the
graph (no compute); initialisation always builds every op, so the parameter tree does not depend
on `alive` and one set of variables serves every mask.

Speed formulation (GitHub issue 3): the edges of a cell that leave the same node (all input edges
form one "wave"; then each intermediate node is the source of one wave) are evaluated together.
Their inputs are stacked along channels and every candidate op runs once per wave in grouped form
(`bnas_jax.search_space.ops`, parameters ``[G, ...]``), depthwise convolutions as shift-and-multiply,
1 x 1 convolutions as (batched) matrix products. That keeps the XLA graph small (fast compile) and
the kernels large (fast step) while being mathematically identical to the per-edge definition.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.models import layers
from bnas_jax.search_space import ops as ops_lib
from bnas_jax.search_space import spaces

Array = jax.Array
Switches = Mapping[str, Array]


def _space(space: Union[str, spaces.SearchSpace]) -> spaces.SearchSpace:
  return space if isinstance(space, spaces.SearchSpace) else spaces.get_space(space)


@dataclasses.dataclass(frozen=True)
class CellSpec:
  """Static description of one searched cell of the supernet.

  Attributes:
    cell_type: ``'normal'`` or ``'reduce'``.
    type_index: index c of this cell among the cells of its type (``switches[cell_type][c]``).
    channels: the cell's C (each node has C channels).
    reduction_prev: whether the previous cell was a reduction cell (k-2 input is twice as large).
  """
  cell_type: str
  type_index: int
  channels: int
  reduction_prev: bool


def cell_plan(space: Union[str, spaces.SearchSpace], init_channels: int,
              num_cells: int) -> tuple[CellSpec, ...]:
  """The searched cells in forward order.

  For bayesnas/darts `num_cells` is the total number of cells (reductions at ``num_cells // 3`` and
  ``2 * num_cells // 3``); for nb201 it is the number of cells per stage (3 stages; the stage
  transitions are fixed residual blocks).

  Raises:
    ValueError: for ``num_cells < 1`` or ``init_channels < 1``.
  """
  sp = _space(space)
  if num_cells < 1 or init_channels < 1:
    raise ValueError(f"num_cells ({num_cells}) and init_channels ({init_channels}) must be >= 1")
  counts = {t: 0 for t in sp.cells}
  plan = []
  if sp.name == "nb201":
    for stage in range(3):
      for _ in range(num_cells):
        plan.append(CellSpec("normal", counts["normal"], init_channels * 2 ** stage, False))
        counts["normal"] += 1
    return tuple(plan)
  c, red_prev = init_channels, False
  for i in range(num_cells):
    red = i in (num_cells // 3, 2 * num_cells // 3)
    if red:
      c *= 2
    tau = "reduce" if red else "normal"
    plan.append(CellSpec(tau, counts[tau], c, red_prev))
    counts[tau] += 1
    red_prev = red
  return tuple(plan)


def cell_counts(space: Union[str, spaces.SearchSpace], num_cells: int) -> dict[str, int]:
  """Number of cells of each type, ``{tau: n}`` (only types that occur)."""
  counts: dict[str, int] = {}
  for spec in cell_plan(space, 1, num_cells):
    counts[spec.cell_type] = counts.get(spec.cell_type, 0) + 1
  return counts


def init_switches(space: Union[str, spaces.SearchSpace], num_cells: int) -> dict[str, Array]:
  """All-ones switches ``{tau: f32[n_tau, E, 1 + n_ops]}`` (spec 2.2: initialised to 1.0)."""
  sp = _space(space)
  return {t: jnp.ones(s, jnp.float32)
          for t, s in sp.switch_shapes(cell_counts(sp, num_cells)).items()}


def _waves(topo: spaces.CellTopology) -> list[tuple[int, tuple[int, ...]]]:
  """Edges grouped by source: [(wave_key, edge indices)], input nodes form one wave (key -1)."""
  groups: dict[int, list[int]] = {}
  for i, e in enumerate(topo.edges):
    key = -1 if e.source < topo.num_inputs else e.source
    groups.setdefault(key, []).append(i)
  return sorted((k, tuple(v)) for k, v in groups.items())


def _mix(parts: Array, weights: Array) -> Array:
  """``out[..., t, :] = sum_g weights[..., g, t] * parts[..., g, :]`` as one fused multiply-reduce.

  Args:
    parts: f32[B, H, W, G, C].
    weights: f32[G, T] (shared) or f32[B, G, T] (per example).

  Returns:
    f32[B, H, W, T, C]. One reduction instead of G scalings and adds: its gradient with respect to
    `weights` is a single reduction too (this keeps the XLA graph of the step small). An einsum
    is 7x faster on its own (f32[32, 32, 32, 8, 8], T = 4, fwd + bwd: 8.8 against 62 ms) and
    halves the skip-only darts step, but made the full darts step about 10 % slower in an
    interleaved A/B: this broadcast form fuses with the ops around it, the matrix products do not.
  """
  w = weights[..., None] if weights.ndim == 2 else weights[:, None, None, :, :, None]
  return jnp.sum(parts[..., :, None, :] * w, axis=-3)


class Cell(nn.Module):
  """One searched cell; inputs are the (preprocessed) node tensors.

  Per wave (the edges leaving one node, or all input edges), the origin-scaled inputs of all edges
  are formed at once (`_mix` with a [sources, edges] switch matrix), every candidate op runs once in
  grouped form on the edges where it is alive, and each op's outputs are switch-scaled and routed
  to their target nodes by one `_mix` with an [edges, targets] matrix. Mathematically this is
  ``node_t = sum_{edges e -> t} sum_op s_op * op(s_origin * x_source)`` (spec 2.1).
  """
  space: str
  channels: int
  cell_type: str
  alive: Optional[tuple[tuple[bool, ...], ...]] = None
  affine: bool = False
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, inputs: tuple[Array, ...], sw: Array, *, train: bool) -> Array:
    sp = spaces.get_space(self.space)
    topo = sp.cells[self.cell_type]
    n_e, n_k = sp.group_shape(self.cell_type)
    full = self.is_initializing() or self.alive is None
    alive = np.ones((n_e, n_k), bool) if full else np.array(self.alive, bool)
    if alive.shape != (n_e, n_k):
      raise ValueError(f"alive mask for {self.cell_type!r} has shape {alive.shape}, expected "
                       f"{(n_e, n_k)}")
    nodes: dict[int, Array] = dict(enumerate(inputs))
    acc: dict[int, Array] = {}
    in_shape = inputs[-1].shape
    c = self.channels
    for key, eids in _waves(topo):
      stride = topo.stride(topo.edges[eids[0]])
      if key >= 0:  # intermediate source: all edges into it are done by now.
        nodes[key] = acc.get(key, self._zeros(in_shape, topo.reduction))
      g_all = len(eids)
      live = [g for g, e in enumerate(eids) if alive[e, 0] and alive[e, 1:].any()]
      if not live:
        continue
      wsw = jnp.take(sw, np.asarray(eids, np.int32), axis=-2)  # [(B,) G, K]
      # Origin-scaled inputs of all edges of the wave: xin[..., g, :] = s_origin(e_g) * x_src(e_g).
      srcs = sorted({topo.edges[eids[g]].source for g in live})
      onehot = np.zeros((len(srcs), g_all), np.float32)
      for g in live:
        onehot[srcs.index(topo.edges[eids[g]].source), g] = 1.0
      xsrc = jnp.stack([nodes[s] for s in srcs], axis=-2)  # [B, H, W, S, C]
      xin = _mix(xsrc, wsw[..., None, :, 0] * onehot)  # [B, H, W, G, C]
      targets = sorted({topo.edges[eids[g]].target for g in live})
      route = np.zeros((g_all, len(targets)), np.float32)
      for g in live:
        route[g, targets.index(topo.edges[eids[g]].target)] = 1.0
      out = None
      for k, op_name in enumerate(sp.ops):
        sel = tuple(g for g in live if alive[eids[g], 1 + k])
        if not sel:
          continue
        idx = np.asarray(sel, np.int32)
        b, h, w = xin.shape[:3]
        x = (xin if len(sel) == g_all else xin[..., idx, :]).reshape(b, h, w, len(sel) * c)
        kw = {"groups": g_all, "select": None if len(sel) == g_all else sel,
              "dw_impl": self.dw_impl}
        if sp.family != "bayesnas":
          kw["affine"] = self.affine
        op = ops_lib.OPS[sp.family][op_name](c, stride, name=f"w{key + 1}_{op_name}", **kw)
        y = op(x, train=train)
        if sp.family == "darts" and "pool" in op_name:
          y = ops_lib.BatchNorm(False, g_all, kw["select"],
                                name=f"w{key + 1}_{op_name}_bn")(y, train=train)
        # Switch-scale and route: weights [(B,) n_sel, T] = s_op(e_g) * [target(e_g) == t].
        wts = jnp.take(wsw[..., 1 + k], idx, axis=-1)[..., None] * route[idx]
        term = _mix(y.reshape(*y.shape[:3], len(sel), c), wts)
        out = term if out is None else out + term
      for ti, t in enumerate(targets):
        acc[t] = out[..., ti, :] if t not in acc else acc[t] + out[..., ti, :]
    outs = [acc.get(t, nodes.get(t)) for t in topo.concat]
    outs = [o if o is not None else self._zeros(in_shape, topo.reduction) for o in outs]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)

  def _zeros(self, in_shape, reduction: bool) -> Array:
    b, h, w, _ = in_shape
    if reduction:
      h, w = (h + 1) // 2, (w + 1) // 2
    return jnp.zeros((b, h, w, self.channels), jnp.float32)


class Supernet(nn.Module):
  """The search supernet (see the module docstring).

  Attributes:
    space: search space name (``'bayesnas'``, ``'darts'``, ``'nb201'``).
    init_channels: C of the first cell (bayesnas official 36, darts 16, nb201 16).
    num_cells: total cells (bayesnas/darts) or cells per stage (nb201).
    num_classes: classifier outputs.
    alive: static `spaces.FrozenMask` or None (everything alive).
    dw_impl: depthwise implementation (`bnas_jax.models.layers.depthwise_conv`): ``'shift'``
      (every AD mode), ``'shift_vjp'`` (fastest training step on CPU; reverse mode only) or
      ``'lax'`` (reference; fastest on GPU).
  """
  space: str
  init_channels: int
  num_cells: int
  num_classes: int
  alive: Optional[spaces.FrozenMask] = None
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, images: Array, switches: Switches, *, train: bool) -> Array:
    """Logits f32[B, num_classes] for images f32[B, H, W, 3].

    Raises:
      ValueError: if the switch tree does not match the space / cell counts.
    """
    sp = spaces.get_space(self.space)
    plan = cell_plan(sp, self.init_channels, self.num_cells)
    expected = sp.switch_shapes(cell_counts(sp, self.num_cells))
    if set(switches) != set(expected):
      raise ValueError(f"switches have cell types {sorted(switches)}, expected {sorted(expected)}")
    for t, shp in expected.items():
      got = tuple(switches[t].shape)
      if got != shp and not (len(got) == 4 and got[1:] == shp and got[0] == images.shape[0]):
        raise ValueError(f"switches[{t!r}] has shape {got}, expected {shp} or "
                         f"{(images.shape[0], *shp)} (per-example)")
    alive = dict(self.alive) if self.alive is not None else {}

    def cell_sw(t, c):
      s = switches[t]
      return s[c] if s.ndim == 3 else s[:, c]

    c0 = self.init_channels
    if sp.name == "nb201":
      x = ops_lib.Conv(c0, 3, 1, 1, name="stem_conv")(images)
      x = ops_lib.BatchNorm(True, name="stem_bn")(x, train=train)
      for i, spec in enumerate(plan):
        if i and spec.channels != plan[i - 1].channels:
          x = ops_lib.ResNetBasicBlock(spec.channels, 2, True, name=f"resblock_{i}")(x, train=train)
        x = Cell(sp.name, spec.channels, spec.cell_type, alive.get(spec.cell_type), False,
                 self.dw_impl, name=f"cell_{i}")((x,), cell_sw(spec.cell_type, spec.type_index),
                                                 train=train)
      x = nn.relu(ops_lib.BatchNorm(True, name="lastact_bn")(x, train=train))
    else:
      x = ops_lib.Conv(3 * c0, 3, 1, 1, name="stem_conv")(images)
      if sp.name == "darts":
        x = ops_lib.BatchNorm(True, name="stem_bn")(x, train=train)
      s0 = s1 = x
      for i, spec in enumerate(plan):
        c = spec.channels
        if sp.name == "bayesnas":
          p0 = ops_lib.CReduct(c, spec.reduction_prev, name=f"cell_{i}_pre0")(s0, train=train)
          p1 = ops_lib.CReduct(c, False, name=f"cell_{i}_pre1")(s1, train=train)
        else:
          if spec.reduction_prev:
            p0 = ops_lib.FactorizedReduce(c, False, name=f"cell_{i}_pre0")(s0, train=train)
          else:
            p0 = ops_lib.ReLUConvBN(c, 1, 1, 0, False, name=f"cell_{i}_pre0")(s0, train=train)
          p1 = ops_lib.ReLUConvBN(c, 1, 1, 0, False, name=f"cell_{i}_pre1")(s1, train=train)
        out = Cell(sp.name, c, spec.cell_type, alive.get(spec.cell_type), False, self.dw_impl,
                   name=f"cell_{i}")((p0, p1), cell_sw(spec.cell_type, spec.type_index),
                                     train=train)
        s0, s1 = s1, out
      x = s1
      if sp.name == "bayesnas":
        x = nn.relu(ops_lib.BatchNorm(True, name="head_bn")(x, train=train))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=layers.torch_uniform(x.shape[-1]),
                    bias_init=layers.torch_uniform(x.shape[-1]), name="classifier")(x)


def create_supernet(space: Union[str, spaces.SearchSpace], init_channels: int, num_cells: int,
                    num_classes: int, alive: Optional[spaces.FrozenMask] = None,
                    **kw) -> Supernet:
  """Builds the `Supernet` of `space` (keywords: ``dw_impl``, where ``'auto'`` is resolved for the
  default backend by `layers.resolve_dw_impl`).

  Raises:
    ValueError: unknown space, or `alive` naming cell types the space does not have.
  """
  sp = _space(space)
  if alive is not None:
    unknown = {t for t, _ in alive} - set(sp.cells)
    if unknown:
      raise ValueError(f"alive mask names cell types {sorted(unknown)} not in space {sp.name!r}")
  if "dw_impl" in kw:  # 'auto' is resolved here, so that the model names its implementation
    kw["dw_impl"] = layers.resolve_dw_impl(kw["dw_impl"])
  return Supernet(sp.name, init_channels, num_cells, num_classes, alive, **kw)


def init_variables(model: Supernet, key: jax.Array, images: Array,
                   switches: Switches) -> dict:
  """``model.init`` made cheap to compile: ``{'params', 'batch_stats'}`` for `model`.

  Flax derives one key per parameter with threefry hashes; XLA:CPU takes minutes to compile a few
  hundred of them. Here the key is re-wrapped as an ``unsafe_rbg`` key (cheap derivations) and
  only two images are used (the variables do not depend on the batch size). Deterministic in
  `key`.

  Args:
    model: the supernet.
    key: a typed PRNG key or a legacy uint32[2] key.
    images: f32[B, H, W, 3] example input (only the first two images are used).
    switches: a switch tree of the right shapes (shared or per-example).
  """
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = jnp.asarray(data, jnp.uint32).reshape(-1)
  rbg = jax.random.wrap_key_data(jnp.concatenate([data, data[::-1] ^ jnp.uint32(0x9E3779B9)])[:4],
                                 impl="unsafe_rbg")
  imgs = images[:2]
  sw = {t: (s[:2] if s.ndim == 4 else s) for t, s in switches.items()}
  return jax.jit(lambda k, x, s: model.init(k, x, s, train=True))(rbg, imgs, sw)
