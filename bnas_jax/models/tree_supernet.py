"""The one-shot supernet of the proxyless search: PyramidNet with a switched tree cell (spec 4.3).

Every block of the PyramidNet backbone (`bnas_jax.models.pyramidnet.backbone`) holds the template
tree of the space (`bnas_jax.search_space.tree.TreeTemplate`, default the complete binary depth-3
tree). With ``s = switches['tree'][block]`` (``f32[E, 1 + 7]``, the `spaces` layout: column 0 the
edge's origin switch, column 1 + i the switch of candidate ``tree.EDGE_OPS[i]``):

* root edge j (fixed, no switch): ``u_j = gconv_3x3(x)`` with the block stride and groups G;
* searched edge e from node p with input x_p: ``z_e = sum_o s[e, 1 + o] * BN0(op_o(x_p))`` (BN0 =
  a non-affine batch norm appended to every candidate during the search, spec 4.3.4, so that each
  switch sets its op's scale);
* branch output ``b_e = s[e, 0] * child(z_e)``: the origin switch sits where the branch enters
  its parent's merge, after the child subtree (spec 4.3.4), and child = identity at a leaf;
* node output = the mean of its live branches (add-copy); the cell output = the mean over the live
  root branches.

The searched edges of a block all map C -> C at stride 1: their parameters are one stack
(``params['edges'][op]`` with a leading axis E) and they run as one `jax.lax.scan` over the edges
in breadth-first order, so that XLA compiles one edge body per block rather than 7 candidates
for each of the E edges (the compile time of the CPU search, docs/proxyless.md). The static
``alive`` mask (`spaces.freeze_mask` of the prior's group mask) removes dead edges from the scan
(``pruned_ops='skip'``; ``'mask'`` keeps them and multiplies them by 0) and multiplies dead
candidates of live edges by 0; an edge under a dead edge is never reached (its switches get zero
gradient), and a node with no live branch removes the branch above it (spec 4.4). The parameter
tree does not depend on `alive` (init builds everything), so one set of variables serves every
mask, as in `bnas_jax.models.supernet`. Switches may carry a leading per-example axis
(``f32[B, 3N, E, K]``), as the per-example curvature estimators pass them.

Switch groups (spec 4.3.5): one cell type ``'tree'`` with ``n = 3N`` cells, so the copies of a
switch in all blocks form one group of the group-ARD prior.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.models import layers
from bnas_jax.models import pyramidnet
from bnas_jax.search_space import spaces
from bnas_jax.search_space import tree as tree_lib

Array = jax.Array


def cell_counts(space: spaces.SearchSpace, num_cells: int) -> dict[str, int]:
  """``{'tree': 3N}``: one tree cell per block, N = `num_cells` blocks per stage.

  Raises:
    ValueError: ``num_cells < 1``.
  """
  if int(num_cells) < 1:
    raise ValueError(f"num_cells (blocks per stage) must be >= 1, got {num_cells}")
  del space
  return {tree_lib.CELL_TYPE: 3 * int(num_cells)}


class EdgeCandidates(nn.Module):
  """One searched edge: ``sum_o s[o] * BN0(op_o(x))`` over the candidates `ops`.

  Attributes:
    channels: C (every searched edge maps C -> C at stride 1).
    ops: the candidates computed, a subset of `tree.EDGE_OPS` in its order (the parameters of the
      others are passed through untouched).
    dw_impl: depthwise / pooling implementation.

  Call: ``(x f32[B, H, W, C], s f32[1 + K] or per example f32[B, 1 + K], train=)`` with `s` the
  edge's switch row (`spaces` layout: column 1 + i is candidate ``tree.EDGE_OPS[i]``).
  """
  channels: int
  ops: tuple[str, ...] = tree_lib.EDGE_OPS
  dw_impl: str = "shift"

  @nn.compact
  def __call__(self, x: Array, s: Array, *, train: bool) -> Array:
    out = None
    for op in self.ops:
      v = s[..., 1 + tree_lib.EDGE_OPS.index(op)]
      v = v if v.ndim == 0 else v[:, None, None, None]
      y = pyramidnet.EdgeOp(op, self.channels, 1, 1, self.dw_impl, search_bn=True,
                            name=op)(x, train=train) * v
      out = y if out is None else out + y
    return out


def live_edges(template: tree_lib.TreeTemplate, alive: np.ndarray) -> np.ndarray:
  """``bool[E]``: the searched edges the supernet computes under the static mask `alive`
  (``bool[E, 1 + K]``): an edge whose origin and at least one op are alive, whose parent node is
  reached (top-down death) and which ends in a leaf or in a node with a live branch (bottom-up
  death, spec 4.4)."""
  live = np.zeros(len(template.edges), bool)

  def visit(parent: str) -> bool:
    any_live = False
    for e in template.children(parent):
      ok = bool(alive[e, 0] and alive[e, 1:].any())
      if ok and not template.edges[e].leaf:
        ok = visit(template.edges[e].path)
      live[e] = ok
      any_live |= ok
    return any_live

  for child in template.root_children:
    visit(child)
  return live


def _tree_take(tree, idx):
  return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


class SupernetCell(nn.Module):
  """The switched template tree of one block: f32[B, H, W, C] -> f32[B, H/s, W/s, C].

  The root edges are unrolled (the block stride); the searched edges, which all map C -> C at
  stride 1, share one parameter stack (``params['edges'][op]``: leading axis E, the edges in
  switch order) and run as one `jax.lax.scan` over the edges in breadth-first order (a buffer of
  node inputs is its carry), so XLA compiles one edge body per block instead of one per edge.

  Attributes:
    space: the tree space's registry name.
    channels: C.
    stride: the block stride (root edges).
    groups: G of the root edges.
    alive: static ``bool[E, 1 + K]`` rows (None: all alive).
    dw_impl: depthwise / pooling implementation.
    pruned_ops: ``'skip'``: an edge the mask removes is not computed, nor a candidate that is
      dead on every live edge of the block (a candidate dead on some edges only is computed and
      multiplied by 0 there); ``'mask'``: every edge and candidate is computed and the dead ones
      multiplied by 0. Both are the same function.
    unroll: unroll the scan (`jax.lax.scan`'s ``unroll``).
  """
  space: str
  channels: int
  stride: int = 1
  groups: int = 2
  alive: Optional[tuple[tuple[bool, ...], ...]] = None
  dw_impl: str = "shift"
  pruned_ops: str = "skip"
  unroll: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool, sw: Array) -> Array:
    """Args: x f32[B, H, W, C]; sw f32[E, 1 + K] or per example f32[B, E, 1 + K]."""
    sp = spaces.get_space(self.space)
    tmpl = sp.template
    edges = tmpl.edges
    shape = sp.group_shape(tree_lib.CELL_TYPE)
    init = self.is_initializing()
    alive = (np.ones(shape, bool) if init or self.alive is None else np.array(self.alive, bool))
    if alive.shape != shape:
      raise ValueError(f"alive mask has shape {alive.shape}, expected {shape}")
    if sw.shape[-2:] != shape:
      raise ValueError(f"switches of one block have shape {sw.shape}, expected {shape} or "
                       f"(B, {shape[0]}, {shape[1]})")
    c = self.channels
    live = live_edges(tmpl, alive)
    stack = EdgeCandidates(c, tuple(sp.ops), self.dw_impl, parent=None)

    roots = {}
    for j, child in enumerate(tmpl.root_children):
      if not (init or self.pruned_ops == "mask" or any(live[e] for e in tmpl.children(child))):
        continue  # a root branch whose node has no live branch is dead (not computed)
      roots[child] = pyramidnet.EdgeOp(tree_lib.ROOT_OP, c, self.stride, self.groups,
                                       self.dw_impl, name=f"R{j + 1}_{tree_lib.ROOT_OP}")(
                                           x, train=train)

    if init:  # one initialiser for the whole stack; only shapes matter for the output
      u = next(iter(roots.values()))

      def init_vars(key):
        x0, s0 = jnp.zeros_like(u), jnp.ones(shape[1:], jnp.float32)
        return jax.vmap(lambda k: stack.init(k, x0, s0, train=True))(
            jax.random.split(key, len(edges)))

      v = init_vars(self.make_rng("params"))
      self.param("edges", lambda _: v["params"])
      self.variable("batch_stats", "edges", lambda: v["batch_stats"])
      return jnp.zeros_like(u)

    params = self.get_variable("params", "edges")
    stats = self.variable("batch_stats", "edges", dict)
    update_stats = train and self.is_mutable_collection("batch_stats")
    new_stats = stats.value
    z: dict[int, Array] = {}  # searched edge -> its candidates' sum
    idx = np.arange(len(edges)) if self.pruned_ops == "mask" else np.flatnonzero(live)
    if len(idx):
      rows = alive[idx] & live[idx, None] if self.pruned_ops == "mask" else alive[idx]
      ops = tuple(op for k, op in enumerate(sp.ops) if rows[:, 1 + k].any())
      mod = stack if ops == stack.ops else stack.clone(ops=ops, parent=None)
      s_rows = jnp.take(sw, jnp.asarray(idx), axis=-2)
      if not rows[:, 1:].all():  # candidates dead on some edges: multiplied by 0 there
        m = jnp.asarray(rows, jnp.float32)
        s_rows = s_rows * (m if s_rows.ndim == 2 else m[None])
      if s_rows.ndim == 3:
        s_rows = jnp.moveaxis(s_rows, 1, 0)  # per example: [E', B, 1 + K]
      # Node inputs by `TreeTemplate.node_id` (the root's children, then the inner nodes), plus
      # one scratch slot that the leaf edges write to. The edges come in breadth-first order, so
      # an edge's input node is written before the edge runs.
      u = next(iter(roots.values()))
      scratch = tmpl.output_id
      buf = jnp.zeros((scratch + 1, *u.shape), u.dtype)
      for child, r in roots.items():
        buf = buf.at[tmpl.node_id(child)].set(r)
      src = np.asarray([tmpl.node_id(edges[e].parent) for e in idx], np.int32)
      dst = np.asarray([scratch if edges[e].leaf else tmpl.node_id(edges[e].path) for e in idx],
                       np.int32)

      def body(nodes, xs, mod=mod):
        p_e, st_e, si, di, s_e = xs
        x_e = jax.lax.dynamic_index_in_dim(nodes, si, 0, keepdims=False)
        if update_stats:
          y, upd = mod.apply({"params": p_e, "batch_stats": st_e}, x_e, s_e, train=True,
                             mutable=["batch_stats"])
          st_e = {**st_e, **upd["batch_stats"]}
        else:
          y = mod.apply({"params": p_e, "batch_stats": st_e}, x_e, s_e, train=train)
        return jax.lax.dynamic_update_index_in_dim(nodes, y, di, 0), (y, st_e)

      j = jnp.asarray(idx)
      whole = len(idx) == len(edges)
      _, (ys, st_out) = jax.lax.scan(
          body, buf, (params if whole else _tree_take(params, j),
                      new_stats if whole else _tree_take(new_stats, j), src, dst, s_rows),
          unroll=self.unroll)
      for i, e in enumerate(idx):
        z[int(e)] = ys[i]
      if update_stats:
        new_stats = st_out if whole else jax.tree_util.tree_map(
            lambda a, v: a.at[j].set(v), new_stats, st_out)
    if update_stats:
      stats.value = new_stats

    def switch(e: int, k: int) -> Array:
      v = sw[..., e, k]
      return v if v.ndim == 0 else v[:, None, None, None]

    def node_out(parent: str) -> Array:
      outs = []
      for e in tmpl.children(parent):
        if not live[e]:
          continue
        y = z[e] if edges[e].leaf else node_out(edges[e].path)
        outs.append(y * switch(e, 0))
      return sum(outs[1:], outs[0]) / float(len(outs))

    outs = [node_out(child) for child in roots
            if any(live[e] for e in tmpl.children(child))]
    if not outs:  # the whole cell is pruned: the block is shortcut-only (spec 4.4 "root")
      b, h, w, _ = x.shape
      return jnp.zeros((b, -(-h // self.stride), -(-w // self.stride), c), x.dtype)
    return sum(outs[1:], outs[0]) / float(len(outs))


class TreeSupernet(nn.Module):
  """The proxyless-search supernet (module docstring).

  Attributes:
    space: tree space name (``'tree'``).
    init_channels: stem width (16 in the spec).
    num_cells: N, blocks per stage.
    num_classes: classifier outputs.
    alpha: PyramidNet widening.
    groups: G.
    alive: static `spaces.FrozenMask` or None.
    dw_impl: depthwise / pooling implementation (`layers.resolve_dw_impl` names, resolved).
    pruned_ops: ``'skip'`` or ``'mask'`` (`SupernetCell`).
    edge_loop: ``'scan'`` (one compiled edge body per block) or ``'unroll'`` (the same scan
      unrolled: a longer compile).
  """
  space: str
  init_channels: int
  num_cells: int
  num_classes: int
  alpha: float = 48.0
  groups: int = 2
  alive: Optional[spaces.FrozenMask] = None
  dw_impl: str = "shift"
  pruned_ops: str = "skip"
  edge_loop: str = "scan"

  @nn.compact
  def __call__(self, images: Array, switches, *, train: bool) -> Array:
    """Logits f32[B, num_classes] for images f32[B, H, W, 3] and ``{'tree': f32[3N, E, K]}``
    (or per example ``f32[B, 3N, E, K]``).

    Raises:
      ValueError: a switch tree of the wrong cell types or shapes.
    """
    sp = spaces.get_space(self.space)
    expected = sp.switch_shapes(cell_counts(sp, self.num_cells))
    if set(switches) != set(expected):
      raise ValueError(f"switches have cell types {sorted(switches)}, expected {sorted(expected)}")
    sw = switches[tree_lib.CELL_TYPE]
    want = expected[tree_lib.CELL_TYPE]
    if tuple(sw.shape) != want and tuple(sw.shape) != (images.shape[0], *want):
      raise ValueError(f"switches['tree'] has shape {tuple(sw.shape)}, expected {want} or "
                       f"{(images.shape[0], *want)} (per-example)")
    rows = dict(self.alive).get(tree_lib.CELL_TYPE) if self.alive is not None else None
    widths = pyramidnet.pyramid_widths(self.num_cells, self.alpha, self.groups,
                                       self.init_channels)
    factory = functools.partial(SupernetCell, space=self.space, groups=self.groups, alive=rows,
                                dw_impl=self.dw_impl, pruned_ops=self.pruned_ops,
                                unroll=self.edge_loop == "unroll")
    block_sw = (lambda k: {"sw": sw[k]}) if sw.ndim == 3 else (lambda k: {"sw": sw[:, k]})
    return pyramidnet.backbone(images, widths, factory, block_sw, train=train,
                               num_classes=self.num_classes, start_channels=self.init_channels)


def create_tree_supernet(space: spaces.SearchSpace, init_channels: int, num_cells: int,
                         num_classes: int, alive: Optional[spaces.FrozenMask] = None, *,
                         alpha: float = 48.0, groups: int = 2, dw_impl: str = "auto",
                         edge_loop: str = "scan", pruned_ops: str = "skip",
                         remat: bool = True) -> TreeSupernet:
  """Builds the `TreeSupernet` (what `bnas_jax.models.supernet.create_supernet` returns for a tree
  space; ``config.model`` fields ``alpha`` and ``groups`` arrive here as keywords).

  `edge_loop` and `pruned_ops` are the cell supernet's formulation options with the same meaning
  here (`TreeSupernet`; ``check_loop_options`` has validated them); `remat` is accepted and has no
  effect (the tree's activations are small enough to store).

  Raises:
    ValueError: bad widths (`pyramidnet.pyramid_widths`), an unknown `dw_impl`, or a
      `pruned_ops` other than ``'skip'`` / ``'mask'`` (a formulation without the static mask
      would average each node over all its template branches, dead ones included: another
      function).
  """
  del remat
  if pruned_ops not in ("skip", "mask"):
    raise ValueError(f"model.pruned_ops={pruned_ops!r} is not supported by the tree supernet; use "
                     "'skip' or 'mask'")
  pyramidnet.pyramid_widths(num_cells, alpha, groups, init_channels)  # validates
  return TreeSupernet(space.name, int(init_channels), int(num_cells), int(num_classes),
                      float(alpha), int(groups), alive, layers.resolve_dw_impl(dw_impl),
                      str(pruned_ops), str(edge_loop))
