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
copy). The static ``alive`` mask (``spaces.freeze_mask``) removes dead edges and, with the default
``pruned_ops='skip'``, pruned ops from the graph (no compute; ``'mask'`` zeroes them instead, see
`Supernet`); initialisation always builds every op, so the parameter tree does not depend on
`alive` and one set of variables serves every mask.

Formulation for compile time and speed: the edges of a cell run one at a time inside a
`lax.scan` (`Cell`), so XLA compiles one loop body per cell (two for a reduction cell) instead of
every edge. Each edge is an `EdgeOps` (all candidate ops of one edge); their parameters are
stacked along a leading edge axis. Depthwise convolutions are shift-and-multiply with custom
VJPs (`layers.depthwise_conv`),
dense k x k convolutions inside the loop are im2col matrix products (`layers.conv`). With
``edge_loop='unroll'`` the same loop is fully unrolled: on CPU a faster step (XLA runs
independent edges on several cores) for a longer compile; the parameters are the same. By default
(``remat=True``) each edge is a `jax.checkpoint`: the backward pass recomputes the edge from its
input instead of reading stored activations, which on CPU is faster (the step is bound by memory
traffic) and needs far less activation memory. Figures: docs/performance.md.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.models import layers
from bnas_jax.models import ops as ops_lib
from bnas_jax.search_space import spaces
from bnas_jax.search_space import tree as tree_lib

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
  if tree_lib.is_tree_space(_space(space)):  # the proxyless search: one tree cell per block
    from bnas_jax.models import tree_supernet  # pylint: disable=g-import-not-at-top
    return tree_supernet.cell_counts(_space(space), num_cells)
  counts: dict[str, int] = {}
  for spec in cell_plan(space, 1, num_cells):
    counts[spec.cell_type] = counts.get(spec.cell_type, 0) + 1
  return counts


def init_switches(space: Union[str, spaces.SearchSpace], num_cells: int) -> dict[str, Array]:
  """All-ones switches ``{tau: f32[n_tau, E, 1 + n_ops]}`` (spec 2.2: initialised to 1.0)."""
  sp = _space(space)
  return {t: jnp.ones(s, jnp.float32)
          for t, s in sp.switch_shapes(cell_counts(sp, num_cells)).items()}


class EdgeOps(nn.Module):
  """The candidate ops of one edge: ``sum_k s_k * op_k(s_origin * x)`` (spec 2.1).

  Attributes:
    family: op family (`bnas_jax.models.ops.OPS`).
    op_names: the space's candidate op names, in switch order.
    channels: C.
    stride: 1, or 2 for the input edges of a reduction cell.
    alive_ops: static per-op mask (None: all); ops that are not alive are not built or computed
      outside ``init``.
    affine, dw_impl: passed to the ops.
    conv_impl: `layers.conv` impl of the dense k x k convs (`ops.DENSE_CONV_OPS`; the other ops ignore it).
    param_free_bn: BN(affine=False) after every parameter-free op (identity skip, pools), so that
      every candidate op's output has unit scale per channel, like the ops that end in a BN, and
      switch sizes compare across ops. The DARTS-family supernets always put it after pools.
    pool_bn: BN(affine=False) after the pools only, as the DARTS-family supernets do, so that a
      pool's output, whose scale an average over the window shrinks, has unit scale per channel
      before its switch (implied by `param_free_bn`).
  """
  family: str
  op_names: tuple[str, ...]
  channels: int
  stride: int
  alive_ops: Optional[tuple[bool, ...]] = None
  affine: bool = False
  dw_impl: str = "shift"
  conv_impl: str = "lax"
  param_free_bn: bool = False
  pool_bn: bool = False

  @nn.compact
  def __call__(self, x: Array, s: Array, *, train: bool) -> Array:
    """f32[B, H', W', C] for ``x: f32[B, H, W, C]`` and switches ``s: f32[1 + K]`` or
    ``f32[B, 1 + K]`` (origin first)."""
    bc = (lambda v: v) if s.ndim == 1 else (lambda v: v[:, None, None, None])
    x = x * bc(s[..., 0])
    options = ops_lib.OpOptions(self.affine, self.dw_impl, self.conv_impl)
    out = None
    for k, name in enumerate(self.op_names):
      if name == "none":  # Zero: contributes exactly 0 and has no parameters.
        continue
      if (self.alive_ops is not None and not self.alive_ops[k]
          and not self.is_initializing()):
        continue
      y = ops_lib.get_op(self.family, name, self.channels, self.stride, options,
                         module_name=name)(x, train=train)
      if ((self.family == "darts" or self.param_free_bn or self.pool_bn) and "pool" in name
          or self.param_free_bn and name == "skip_connect" and self.stride == 1):
        y = ops_lib.BatchNorm(False, name=f"{name}_bn")(y, train=train)
      term = y * bc(s[..., 1 + k])
      out = term if out is None else out + term
    if out is None:
      b, h, w, _ = x.shape
      out = jnp.zeros((b, -(-h // self.stride), -(-w // self.stride), self.channels), x.dtype)
    return out


EDGE_LOOPS = ("scan", "unroll")
PRUNED_OPS = ("skip", "mask", "zero")


def check_loop_options(edge_loop: str, pruned_ops: str) -> None:
  """Raises ValueError naming `edge_loop` / `pruned_ops` if not in `EDGE_LOOPS` / `PRUNED_OPS`."""
  for name, value, allowed in (("edge_loop", edge_loop, EDGE_LOOPS),
                               ("pruned_ops", pruned_ops, PRUNED_OPS)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r}; use one of {', '.join(allowed)}")


def _tree_take(tree, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _edge_groups(topo: spaces.CellTopology, eids: list[int], alive: np.ndarray,
                 pruned_ops: str = "skip") -> list[list[int]]:
  """The live edges of one phase, as runs that one loop body can evaluate in order.

  `eids` are ordered by target node. If every live edge keeps the same candidate ops, or with
  ``pruned_ops='mask'``, they form one run (one `lax.scan`). Otherwise the edges into each target
  node (which do not depend on each other) are split by their set of kept ops, so that a pruned op
  is never computed.

  Returns:
    Lists of positions into `eids`.
  """
  live = [j for j, e in enumerate(eids) if alive[e, 0] and alive[e, 1:].any()]
  sig = lambda j: tuple(bool(a) for a in alive[eids[j], 1:])
  if pruned_ops == "mask" or len({sig(j) for j in live}) <= 1:
    return [live] if live else []
  groups = []
  for t in sorted({topo.edges[eids[j]].target for j in live}):
    into = [j for j in live if topo.edges[eids[j]].target == t]
    for kept in sorted({sig(j) for j in into}):
      groups.append([j for j in into if sig(j) == kept])
  return groups


def _loop_conv_impl(family: str, edge_loop: str, dw_impl: str) -> str:
  """The `layers.conv` impl of the dense k x k convs of a cell's edges (docs/performance.md).

  In the scan over edges XLA:CPU runs the convolutions of JAX's transpose rules slowly; so on the
  CPU paths (`dw_impl` other than 'lax') the BayesNAS dilated convs are 'lax_vjp' in reverse mode
  ('shift_vjp') and im2col matrix products otherwise (forward-mode curvature, 'shift'), and the
  NAS-Bench-201 3 x 3 convs stay im2col products. Unrolled edges and 'lax' use XLA convolutions.
  """
  if edge_loop != "scan" or dw_impl == "lax":
    return "lax"
  return "lax_vjp" if family == "bayesnas" and dw_impl == "shift_vjp" else "im2col"


class Cell(nn.Module):
  """One searched cell; inputs are the (preprocessed) node tensors.

  The edges run one at a time in a `lax.scan` over a stacked node buffer (see the module
  docstring): edge e reads node ``source(e)``, applies `EdgeOps` with its own slice of the stacked
  parameters and adds the result into node ``target(e)``. Edges are ordered by target node, so every
  source is complete when it is read. A normal cell is one scan over all edges (the buffer holds
  the input and intermediate nodes); a reduction cell is a scan over its stride-2 input edges
  (phase ``edges_in``, reading the inputs) and one over the rest (phase ``edges``).

  Parameters: ``{phase: {op name: {...}}}`` with a leading axis over the phase's edges in that
  order; batch statistics likewise. They do not depend on `alive`.

  Attributes:
    space, channels, cell_type: the cell.
    alive: static ``bool[E, 1 + K]`` mask (None: all alive).
    affine: BN affine of the ops.
    dw_impl: see `Supernet`.
    edge_loop: ``'scan'`` (one compiled loop body per phase: fast compile) or ``'unroll'`` (the
      same loop fully unrolled: slower compile, faster step on CPU). See `Supernet`.
    pruned_ops: see `Supernet`.
    remat: see `Supernet`.
    param_free_bn, pool_bn: see `EdgeOps`.
  """
  space: str
  channels: int
  cell_type: str
  alive: Optional[tuple[tuple[bool, ...], ...]] = None
  affine: bool = False
  dw_impl: str = "shift"
  edge_loop: str = "scan"
  pruned_ops: str = "skip"
  remat: bool = True
  param_free_bn: bool = False
  pool_bn: bool = False

  @nn.compact
  def __call__(self, inputs: tuple[Array, ...], sw: Array, *, train: bool) -> Array:
    """Cell output f32[B, H', W', len(concat) * C] for node tensors f32[B, H, W, C].

    Args:
      inputs: the input nodes (already preprocessed to C channels).
      sw: switches f32[E, 1 + K] or per example f32[B, E, 1 + K] (origin first, spec 3.1).
      train: batch statistics (True) or running averages in the batch norms.
    """
    sp = spaces.get_space(self.space)
    topo = sp.cells[self.cell_type]
    n_e, n_k = sp.group_shape(self.cell_type)
    init = self.is_initializing()
    alive = (np.ones((n_e, n_k), bool) if init or self.alive is None or self.pruned_ops == "zero"
             else np.array(self.alive, bool))
    if alive.shape != (n_e, n_k):
      raise ValueError(f"alive mask for {self.cell_type!r} has shape {alive.shape}, expected "
                       f"{(n_e, n_k)}")
    check_loop_options(self.edge_loop, self.pruned_ops)
    c, n_in = self.channels, topo.num_inputs
    b, h, w, _ = inputs[-1].shape
    dtype = jnp.result_type(*inputs)
    if topo.reduction:
      h, w = (h + 1) // 2, (w + 1) // 2
    update_stats = train and not init and self.is_mutable_collection("batch_stats")
    order = sorted(range(n_e), key=lambda i: (topo.edges[i].target, topo.edges[i].source, i))
    if topo.reduction:
      phases = [("edges_in", [i for i in order if topo.edges[i].source < n_in], 2),
                ("edges", [i for i in order if topo.edges[i].source >= n_in], 1)]
      base = n_in  # the buffer holds the intermediate nodes only; input edges read `xin`
      buf = jnp.zeros((topo.num_nodes, b, h, w, c), dtype)
      xin = jnp.stack(inputs)
    else:
      phases = [("edges", order, 1)]
      base = 0
      buf = jnp.concatenate([jnp.stack(inputs),
                             jnp.zeros((topo.num_nodes, b, h, w, c), dtype)])
      xin = None
    conv_impl = _loop_conv_impl(sp.family, self.edge_loop, self.dw_impl)
    for pname, eids, stride in phases:
      if not eids:
        continue
      mod = EdgeOps(sp.family, tuple(sp.ops), c, stride, None, self.affine, self.dw_impl,
                    conv_impl, self.param_free_bn, self.pool_bn, parent=None)
      src_shape = inputs[-1].shape if stride == 2 else (b, h, w, c)

      def init_vars(key, mod=mod, src_shape=src_shape, n=len(eids)):
        x0, s0 = jnp.zeros(src_shape, jnp.float32), jnp.ones((n_k,), jnp.float32)
        return jax.vmap(lambda k: mod.init(k, x0, s0, train=True))(jax.random.split(key, n))

      if init:
        v = init_vars(self.make_rng("params"))
        self.param(pname, lambda _: v["params"])
        self.variable("batch_stats", pname, lambda: v.get("batch_stats", {}))
        continue
      if self.has_variable("params", pname):
        # Not `self.param`: in apply it would trace the (vmapped) init to check shapes.
        params = self.get_variable("params", pname)
      else:
        params = self.param(pname, lambda key: init_vars(key)["params"])
      stats = self.variable("batch_stats", pname, dict)
      new_stats = stats.value
      for grp in _edge_groups(topo, eids, alive, self.pruned_ops):
        kept = tuple(bool(a) for a in alive[[eids[j] for j in grp], 1:].any(axis=0))
        gmod = mod if all(kept) else mod.clone(alive_ops=kept, parent=None)
        whole = len(grp) == len(eids)
        idx = np.asarray(grp, np.int32)
        e_idx = np.asarray([eids[j] for j in grp], np.int32)
        src = np.asarray([topo.edges[e].source - (0 if stride == 2 else base) for e in e_idx],
                         np.int32)
        tgt = np.asarray([topo.edges[e].target - base for e in e_idx], np.int32)
        s_rows = jnp.take(sw, e_idx, axis=-2)
        if s_rows.ndim == 3:
          s_rows = jnp.moveaxis(s_rows, 1, 0)  # per example: [E, B, 1 + K]
        rows = alive[e_idx]
        if not (rows[:, 1:] == np.asarray(kept)).all():  # pruned_ops='mask': zero pruned ops
          m = jnp.asarray(rows, jnp.float32)
          s_rows = s_rows * (m if s_rows.ndim == 2 else m[:, None, :])
        src_buf = xin if stride == 2 else None

        def edge_fn(p_e, st_e, x, s_e, gmod=gmod):
          if update_stats:
            y, upd = gmod.apply({"params": p_e, "batch_stats": st_e}, x, s_e, train=True,
                                mutable=["batch_stats"])
            return y, upd["batch_stats"]
          return gmod.apply({"params": p_e, "batch_stats": st_e}, x, s_e, train=train), st_e
        if self.remat:  # the backward pass recomputes the edge's forward pass from its input
          edge_fn = jax.checkpoint(edge_fn, prevent_cse=False,
                                   policy=jax.checkpoint_policies.nothing_saveable)

        def body(nodes, xs, edge_fn=edge_fn, src_buf=src_buf):
          p_e, st_e, si, ti, s_e = xs
          x = jax.lax.dynamic_index_in_dim(nodes if src_buf is None else src_buf, si, 0, False)
          y, st_e = edge_fn(p_e, st_e, x, s_e)
          cur = jax.lax.dynamic_index_in_dim(nodes, ti, 0, False)
          return jax.lax.dynamic_update_index_in_dim(nodes, cur + y, ti, 0), st_e

        xs = (params if whole else _tree_take(params, idx),
              new_stats if whole else _tree_take(new_stats, idx), src, tgt, s_rows)
        buf, st_out = jax.lax.scan(body, buf, xs, unroll=self.edge_loop == "unroll")
        if update_stats:
          new_stats = st_out if whole else jax.tree_util.tree_map(
              lambda a, u, idx=idx: a.at[idx].set(u), new_stats, st_out)
      if update_stats:
        stats.value = new_stats
    if init:  # only shapes matter during init
      return jnp.zeros((b, h, w, c * len(topo.concat)), jnp.float32)
    outs = [buf[t - base] for t in topo.concat]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


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
    edge_loop: ``'scan'`` (the edges of a cell in a `lax.scan`: fastest compile) or ``'unroll'``
      (the same loop unrolled: on CPU a faster step and a longer compile).
      Both compute the same function with the same parameters.
    pruned_ops: after pruning (`alive`), ``'skip'`` never computes a pruned op: the live edges of
      a cell phase that keep different op sets get one loop each per (target node, kept ops),
      which multiplies the compile time; ``'mask'`` keeps one loop per phase over the ops kept
      on any of its edges and multiplies the pruned ones by 0 (compiles like the full supernet,
      computes more); ``'zero'`` ignores `alive` altogether: the program is the full supernet's,
      so a new mask compiles nothing, and a pruned op or edge contributes nothing because its
      switch is exactly 0 (the search zeroes pruned switches, `bayes.apply_mask`). It computes
      every op at every step; on a CPU, where each pruned supernet costs minutes of compilation,
      it makes a short search start and finish much sooner (docs/performance.md).
    remat: recompute each edge's forward pass in the backward pass (`jax.checkpoint` of the
      edge, saving nothing but its input) instead of storing its activations. Same function and
      gradients. On CPU, where the step is bound by the memory traffic of stored activations,
      it makes the step faster and the activation buffer much smaller (docs/performance.md); on
      a GPU recomputing costs relatively more: compare both settings there.
    param_free_bn: BN(affine=False) after the identity skip and the pools of every edge
      (`EdgeOps`): all candidate ops then output unit scale, so that the switches, and with them
      the ARD variances gamma, compare across ops.
    pool_bn: BN(affine=False) after the pools of every edge only (`EdgeOps`; the darts space
      always has it).
  """
  space: str
  init_channels: int
  num_cells: int
  num_classes: int
  alive: Optional[spaces.FrozenMask] = None
  dw_impl: str = "shift"
  edge_loop: str = "scan"
  pruned_ops: str = "skip"
  remat: bool = True
  param_free_bn: bool = False
  pool_bn: bool = False

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
    # pruned_ops='zero': the mask is not part of the program (the pruned switches are 0).
    alive = dict(self.alive) if self.alive is not None and self.pruned_ops != "zero" else {}

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
                 self.dw_impl, self.edge_loop, self.pruned_ops, self.remat, self.param_free_bn,
                 self.pool_bn, name=f"cell_{i}")(
                     (x,), cell_sw(spec.cell_type, spec.type_index), train=train)
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
                   self.edge_loop, self.pruned_ops, self.remat, self.param_free_bn,
                   self.pool_bn, name=f"cell_{i}")(
                       (p0, p1), cell_sw(spec.cell_type, spec.type_index), train=train)
        s0, s1 = s1, out
      x = s1
      if sp.name == "bayesnas":
        x = nn.relu(ops_lib.BatchNorm(True, name="head_bn")(x, train=train))
    x = layers.global_avg_pool(x)
    return nn.Dense(self.num_classes, kernel_init=layers.torch_uniform(x.shape[-1]),
                    bias_init=layers.torch_uniform(x.shape[-1]), name="classifier")(x)


def create_supernet(space: Union[str, spaces.SearchSpace], init_channels: int, num_cells: int,
                    num_classes: int, alive: Optional[spaces.FrozenMask] = None, *,
                    alpha: float = 48.0, groups: int = 2, **kw) -> Supernet:
  """Builds the `Supernet` of `space` (keywords: ``dw_impl``, where ``'auto'`` is resolved for the
  default backend by `layers.resolve_dw_impl`; ``edge_loop``, ``pruned_ops``, ``remat``).

  `alpha` (widening) and `groups` (group-conv groups) shape the PyramidNet backbone of the tree
  spaces (`bnas_jax.models.tree_supernet`); the cell spaces have no use for them.

  Raises:
    ValueError: unknown space, `alive` naming cell types the space does not have, or an unknown
      ``edge_loop`` or ``pruned_ops``.
  """
  sp = _space(space)
  if alive is not None:
    unknown = {t for t, _ in alive} - set(sp.cells)
    if unknown:
      raise ValueError(f"alive mask names cell types {sorted(unknown)} not in space {sp.name!r}")
  check_loop_options(kw.get("edge_loop", "scan"), kw.get("pruned_ops", "skip"))
  if tree_lib.is_tree_space(sp):  # PyramidNet with a switched tree cell (models/tree_supernet.py)
    if kw.get("pruned_ops") == "zero":
      raise ValueError(f"pruned_ops='zero' applies to the cell spaces; space {sp.name!r} is a "
                       "tree space: use 'skip' or 'mask'")
    for name in ("param_free_bn", "pool_bn"):
      if kw.pop(name, False):
        raise ValueError(f"{name}=True applies to the cell spaces; space {sp.name!r} is a "
                         "tree space: set it False")
    from bnas_jax.models import tree_supernet  # pylint: disable=g-import-not-at-top
    return tree_supernet.create_tree_supernet(sp, init_channels, num_cells, num_classes, alive,
                                              alpha=alpha, groups=groups, **kw)
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
