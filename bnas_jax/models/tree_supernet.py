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

The static ``alive`` mask (`spaces.freeze_mask` of the prior's group mask) removes dead ops and
dead edges from the graph; an edge under a dead edge is never reached (its switches get zero
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


class SupernetCell(nn.Module):
  """The switched template tree of one block: f32[B, H, W, C] -> f32[B, H/s, W/s, C].

  Attributes:
    space: the tree space's registry name.
    channels: C.
    stride: the block stride (root edges).
    groups: G of the root edges.
    alive: static ``bool[E, 1 + K]`` rows (None: all alive).
    dw_impl: depthwise / pooling implementation.
  """
  space: str
  channels: int
  stride: int = 1
  groups: int = 2
  alive: Optional[tuple[tuple[bool, ...], ...]] = None
  dw_impl: str = "shift"

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

    def switch(e: int, k: int) -> Array:
      v = sw[..., e, k]
      return v if v.ndim == 0 else v[:, None, None, None]

    def node_out(parent: str, xp: Array) -> Optional[Array]:
      outs = []
      for e in tmpl.children(parent):
        if not (alive[e, 0] and alive[e, 1:].any()):
          continue
        z = None
        for k, op in enumerate(sp.ops):
          if not alive[e, 1 + k]:
            continue
          y = pyramidnet.EdgeOp(op, c, 1, 1, self.dw_impl, search_bn=True,
                                name=f"{edges[e].path}_{op}")(xp, train=train) * switch(e, 1 + k)
          z = y if z is None else z + y
        if not edges[e].leaf:
          z = node_out(edges[e].path, z)
          if z is None:  # every branch below is dead: so is this one
            continue
        outs.append(z * switch(e, 0))
      if not outs:
        return None
      return sum(outs[1:], outs[0]) / float(len(outs))

    roots = []
    for j, child in enumerate(tmpl.root_children):
      if not init and not any(alive[e, 0] and alive[e, 1:].any() for e in tmpl.children(child)):
        continue  # a root branch whose node has no live branch is dead (not computed)
      u = pyramidnet.EdgeOp(tree_lib.ROOT_OP, c, self.stride, self.groups, self.dw_impl,
                            name=f"R{j + 1}_{tree_lib.ROOT_OP}")(x, train=train)
      out = node_out(child, u)
      if out is not None:
        roots.append(out)
    if not roots:  # the whole cell is pruned: the block is shortcut-only (spec 4.4 "root")
      b, h, w, _ = x.shape
      return jnp.zeros((b, -(-h // self.stride), -(-w // self.stride), c), x.dtype)
    return sum(roots[1:], roots[0]) / float(len(roots))


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
  """
  space: str
  init_channels: int
  num_cells: int
  num_classes: int
  alpha: float = 48.0
  groups: int = 2
  alive: Optional[spaces.FrozenMask] = None
  dw_impl: str = "shift"

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
                                dw_impl=self.dw_impl)
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

  `edge_loop`, `pruned_ops` and `remat` are the cell supernet's formulation options: the tree cell
  is always unrolled with pruned ops skipped and no rematerialisation, so they are accepted
  (``check_loop_options`` has validated them) and have no effect.

  Raises:
    ValueError: bad widths (`pyramidnet.pyramid_widths`) or an unknown `dw_impl`.
  """
  del edge_loop, pruned_ops, remat
  pyramidnet.pyramid_widths(num_cells, alpha, groups, init_channels)  # validates
  return TreeSupernet(space.name, int(init_channels), int(num_cells), int(num_classes),
                      float(alpha), int(groups), alive, layers.resolve_dw_impl(dw_impl))
