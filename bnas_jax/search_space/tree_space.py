"""The proxyless search over tree cells: the supernet template, its switch layout, derivation.

`TreeTemplate` is the maximal tree the supernet holds (proxyless spec 4.3; by default the complete
binary depth-3 tree: 2 fixed root edges, 4 + 8 searched edges with all seven candidates
`tree.EDGE_OPS` each, add-copy merges). Its searched edges are expressed in the cell-search switch
layout of `bnas_jax.search_space.spaces` (`TreeTemplate.topology`): a `CellTopology` whose input
nodes are the root's children (the root edges are fixed and carry no switch, see `TreeTemplate`),
whose intermediate nodes are the other internal nodes plus one output node that every leaf edge
enters, so that `bnas_jax.bayes.connected_edges` applies the tree's top-down death (an edge below
a dead edge has no live source) and bottom-up death (an edge into a node whose branches are all
dead cannot reach the output) of spec 4.4. `derive` turns an alive mask into a `tree.TreeCell`
that is always a valid tree. The spaces ``'tree'`` and ``'tree_tiny'`` are registered in
`spaces.SPACES` on import (`bnas_jax.search_space.spaces` imports `tree`, which imports this).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import numpy as np

from bnas_jax.search_space import spaces
from bnas_jax.search_space.tree import (EDGE_OPS, ROOT_OP, Branch, TreeCell, TreeNode, node)


# --------------------------------------------------------------------------------------------------
# The supernet template and its switch layout.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplateEdge:
  """A searched (non-root) edge of the template.

  Attributes:
    path: the edge's path (R11 = first branch of the root's first child, ...).
    parent: path of the node it leaves (R1, R11, ...).
    leaf: whether the edge ends in a leaf (else in the internal node named `path`).
  """
  path: str
  parent: str
  leaf: bool


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
  """The maximal tree of the supernet (spec 4.3.1, H2): a complete tree, add-copy everywhere.

  ``branches[d]`` is the number of branches of every node at depth d: ``(2, 2, 2)`` = 2 root
  edges (the block's grouped conv, fixed), 4 edges at depth 2 and 8 leaf edges at depth 3, each
  with all of `EDGE_OPS`.

  The root edges carry no switch: a root edge's origin would multiply the origins of all edges
  below it (the same function up to a rescaling of switches the group-l1 prior already shrinks),
  and a root branch dies bottom-up when all of its branches are dead (spec 4.4). This keeps every
  slot of the switch layout a real switch (`bnas_jax.bayes.update` kills an origin whose op
  switches are all dead, so an "origin-only" row would die at the first update).

  Raises:
    ValueError: fewer than 2 levels or a branch count outside 1..3.
  """
  branches: tuple[int, ...] = (2, 2, 2)

  def __post_init__(self):
    object.__setattr__(self, "branches", tuple(int(b) for b in self.branches))
    if len(self.branches) < 2 or any(not 1 <= b <= 3 for b in self.branches):
      raise ValueError(f"TreeTemplate.branches={self.branches}: give >= 2 levels (the root's and "
                       "at least one searched level) of 1-3 branches each")

  @property
  def root_children(self) -> tuple[str, ...]:
    """Paths of the root's children (R1, R2, ...), the input nodes of `topology`."""
    return tuple(f"R{i + 1}" for i in range(self.branches[0]))

  @property
  def edges(self) -> tuple[TemplateEdge, ...]:
    """The searched edges in switch order: breadth first (depth 2, then 3, ...), then by path."""
    out, frontier = [], list(self.root_children)
    for depth in range(1, len(self.branches)):
      nxt = []
      for parent in frontier:
        for i in range(self.branches[depth]):
          path = f"{parent}{i + 1}"
          out.append(TemplateEdge(path, parent, depth == len(self.branches) - 1))
          nxt.append(path)
      frontier = nxt
    return tuple(out)

  def children(self, parent: str) -> tuple[int, ...]:
    """Indices (into `edges`) of the edges leaving node `parent`."""
    return tuple(i for i, e in enumerate(self.edges) if e.parent == parent)

  @property
  def inner_nodes(self) -> tuple[str, ...]:
    """Internal nodes below depth 1 (the intermediate nodes of `topology`, before the output)."""
    return tuple(e.path for e in self.edges if not e.leaf)

  def node_id(self, path: str) -> int:
    """`topology` node id of internal node `path`; the output node is the last id."""
    ids = self.root_children + self.inner_nodes
    return ids.index(path)

  @property
  def output_id(self) -> int:
    return len(self.root_children) + len(self.inner_nodes)

  def topology(self) -> spaces.CellTopology:
    """The searched edges as a `spaces.CellTopology` (see the module docstring).

    Inputs: the root's children; intermediate nodes: the deeper internal nodes, then the output
    node (every leaf edge enters it, concat = (output,)). Edge names are the tree paths.
    """
    edges = tuple(spaces.Edge(e.path, self.node_id(e.parent),
                              self.output_id if e.leaf else self.node_id(e.path))
                  for e in self.edges)
    return spaces.CellTopology(num_inputs=len(self.root_children),
                               num_nodes=len(self.inner_nodes) + 1, edges=edges,
                               concat=(self.output_id,), reduction=False)


CELL_TYPE = "tree"  # the one cell type: one tree cell shared by every block (spec 4.3.5)


@dataclasses.dataclass(frozen=True)
class TreeSearchSpace(spaces.SearchSpace):
  """A `spaces.SearchSpace` over tree cells: one cell type ``'tree'`` whose edges are the
  template's searched edges, ``ops`` = `EDGE_OPS`, plus the `template`."""
  template: TreeTemplate = TreeTemplate()

  def __hash__(self):
    return hash((self.name, self.family, self.ops, self.template))


def make_space(name: str = "tree", template: TreeTemplate = TreeTemplate()) -> TreeSearchSpace:
  """The tree-cell search space `name` over `template` (family ``'tree'``)."""
  return TreeSearchSpace(name=name, family="tree", ops=EDGE_OPS,
                         cells={CELL_TYPE: template.topology()}, template=template)


def is_tree_space(space: Any) -> bool:
  return isinstance(space, TreeSearchSpace)


# --------------------------------------------------------------------------------------------------
# Derivation: alive mask -> a valid tree cell.
# --------------------------------------------------------------------------------------------------


def _group(space: TreeSearchSpace, arrays: Mapping[str, Any], name: str, dtype) -> np.ndarray:
  if not isinstance(arrays, Mapping) or CELL_TYPE not in arrays:
    raise ValueError(f"{name} must be a dict {{'{CELL_TYPE}': array[E, 1 + n_ops]}} for the tree "
                     f"space, got keys {sorted(arrays) if isinstance(arrays, Mapping) else arrays}")
  a = np.asarray(arrays[CELL_TYPE]).astype(dtype)
  want = space.group_shape(CELL_TYPE)
  if a.shape != want:
    raise ValueError(f"{name}[{CELL_TYPE!r}] has shape {a.shape}, expected {want}")
  return a


def derive(space: TreeSearchSpace, alive: Mapping[str, Any],
           scores: Mapping[str, Any] | None = None, max_ops: int = 0) -> TreeCell:
  """Derives a tree cell from the HARD prior's alive mask (spec 4.4-4.5).

  An edge keeps every op whose op switch and origin switch are alive (their outputs are summed);
  it is kept if it ends in a leaf or in a node that keeps at least one branch (bottom-up death);
  an edge below a dropped edge is never visited (top-down death), whatever the mask says. A node
  with one kept branch becomes merge none; with more, add-copy (the mean over the kept branches).
  The root keeps the root branches whose child keeps a branch.

  All pruned (no root branch left, spec 4.4 "forbid this"): with `scores`, the single best path
  is kept: at every node the edge with the best-scored op, down to a leaf (a chain of merge-none
  nodes under the best root branch); a warning is logged. Without scores a ValueError is raised.

  Args:
    space: a `TreeSearchSpace`.
    alive: ``{'tree': bool[E, 1 + n_ops]}`` (index 0 the origin switch, `spaces` layout).
    scores: optional ``{'tree': f32[E, 1 + n_ops]}`` (larger = more important, e.g. the group
      gammas before pruning); used for the fallback and for `max_ops`.
    max_ops: > 0 keeps at most this many ops per edge, the best-scored (needs `scores`); 0 keeps
      every surviving op.

  Returns:
    A `TreeCell` (always valid: every node has at least one branch, every branch op is alive).

  Raises:
    ValueError: bad shapes, `max_ops` < 0 or > 0 without scores, or an all-pruned cell without
      scores that rank its ops.
  """
  if not is_tree_space(space):
    raise ValueError(f"tree.derive needs a TreeSearchSpace, got {getattr(space, 'name', space)!r}")
  a = _group(space, alive, "alive", bool)
  s = None if scores is None else _group(space, scores, "scores", np.float64)
  if max_ops < 0:
    raise ValueError(f"max_ops must be >= 0 (0 = every surviving op), got {max_ops}")
  if max_ops and s is None:
    raise ValueError("max_ops > 0 ranks the ops of an edge by score: pass scores")
  tmpl = space.template
  edges = tmpl.edges

  def edge_ops(i: int) -> tuple[str, ...]:
    if not a[i, 0]:
      return ()
    idx = [k for k in range(len(space.ops)) if a[i, 1 + k]]
    if max_ops and len(idx) > max_ops:
      idx = sorted(sorted(idx, key=lambda k: -s[i, 1 + k])[:max_ops])
    return tuple(space.ops[k] for k in idx)

  def build(parent: str) -> Optional[TreeNode]:
    kept = []
    for i in tmpl.children(parent):
      ops = edge_ops(i)
      if not ops:
        continue
      if edges[i].leaf:
        kept.append(Branch(ops, None))
      else:
        child = build(edges[i].path)
        if child is not None:
          kept.append(Branch(ops, child))
    if not kept:
      return None
    return node("add" if len(kept) > 1 else "none", *kept)

  roots = [Branch((ROOT_OP,), c) for c in (build(p) for p in tmpl.root_children) if c is not None]
  if not roots:
    if s is None:
      raise ValueError("every branch of the tree cell was pruned and no scores were given; pass "
                       "the gammas before pruning (HardPriorState.score) or prune less")
    op_scores = s[:, 1:]
    finite = op_scores[np.isfinite(op_scores)]
    if finite.size == 0 or np.all(finite == finite[0]):
      raise ValueError("every branch of the tree cell was pruned and the scores do not rank its "
                       "ops (all equal or non-finite); pass HardPriorState.score or prune less")
    logging.warning("tree.derive: every branch was pruned; keeping the best-scored path")
    roots = [_best_path(space, op_scores)]
  return TreeCell(node("add" if len(roots) > 1 else "none", *roots), space=space.name)


def _best_path(space: TreeSearchSpace, op_scores: np.ndarray) -> Branch:
  """The root branch holding the best-scored chain: at each node the edge with the best op."""
  tmpl = space.template
  edges = tmpl.edges
  best = lambda i: float(np.max(np.where(np.isfinite(op_scores[i]), op_scores[i], -np.inf)))

  def chain(parent: str) -> tuple[float, TreeNode]:
    options = []
    for i in tmpl.children(parent):
      k = int(np.argmax(np.where(np.isfinite(op_scores[i]), op_scores[i], -np.inf)))
      if edges[i].leaf:
        options.append((best(i), Branch((space.ops[k],), None)))
      else:
        score, child = chain(edges[i].path)
        options.append((min(best(i), score), Branch((space.ops[k],), child)))
    score, branch = max(options, key=lambda o: o[0])
    return score, node("none", branch)

  return Branch((ROOT_OP,), max((chain(p) for p in tmpl.root_children), key=lambda o: o[0])[1])


def check_valid(cell: TreeCell, template: TreeTemplate | None = None) -> None:
  """Raises ValueError unless `cell` is a valid tree (a derived cell passes by construction).

  Checks: every node has >= 1 branch with >= 1 op and its merge fits its branch count (the
  `TreeNode` invariants, re-checked on the object), every node is reachable from the root (true of
  any tree object, checked by walking), and, with `template`, that the cell fits in it (depth and
  branch counts per depth).
  """
  for path, n, depth in cell.nodes():
    if not n.branches or any(not b.ops for b in n.branches):
      raise ValueError(f"node {path} has a branch without ops or no branches")
    if (n.merge == "none") != (len(n.branches) == 1):
      raise ValueError(f"node {path}: merge {n.merge!r} with {len(n.branches)} branches")
    if template is not None:
      if depth >= len(template.branches) or len(n.branches) > template.branches[depth]:
        raise ValueError(f"node {path} (depth {depth}, {len(n.branches)} branches) does not fit "
                         f"the template {template.branches}")


spaces.SPACES.setdefault("tree", make_space("tree"))
# A small template for smoke tests and CI: one root edge, one branch below it, two leaves under
# that (3 searched edges; the depth-3 top-down / bottom-up rules still apply).
spaces.SPACES.setdefault("tree_tiny", make_space("tree_tiny", TreeTemplate((1, 1, 2))))
