"""Tree cells as data: the path-level cell type, TreeCell-A/B, JSON, the supernet template, pictures.

A tree cell (proxyless spec section 2) replaces the 3 x 3 grouped conv in the middle of every
PyramidNet bottleneck (`bnas_jax.models.pyramidnet`). It is a rooted tree:

* a `TreeNode` has an allocation (``copy``: every branch gets the node input; ``split``: branch i
  gets the i-th contiguous channel slice; ``none``: one branch), a merge (``add``: the *mean* of the
  branch outputs; ``concat``: channel concatenation in branch order; ``none``: one branch) and an
  ordered tuple of `Branch` es (spec 2.2);
* a `Branch` is an edge (one op, or several ops whose outputs are summed, as BayesNAS keeps several
  surviving ops on one edge, spec 4.5) followed by a child node, or by nothing (a leaf);
* the root's edges are the block's grouped 3 x 3 conv (``gconv_3x3``, groups G, the block stride);
  every other edge is one of the seven candidates `EDGE_OPS` (spec 2.4), all stride 1.

`TREE_CELL_A` and `TREE_CELL_B` are spec section 3's cells. `TreeCell.to_dict` / `from_dict` /
`save` / `load` are the JSON form (format version 1); `plot` draws a cell.

The search side (spec 4.3-4.4): `TreeTemplate` is the maximal tree the supernet holds (by default
the complete binary depth-3 tree: 2 root edges, 4 + 8 searched edges with all seven candidates
each, add-copy merges). Its searched edges are expressed in the cell-search switch layout of
`bnas_jax.search_space.spaces` (`TreeTemplate.topology`): a `CellTopology` whose input nodes are the
root's children (the root edges are fixed and carry no switch, see `TreeTemplate`), whose
intermediate nodes are the other internal nodes plus one output node that every leaf edge enters,
so that `bnas_jax.bayes.connected_edges` applies the tree's top-down death (an edge below a dead
edge has no live source) and bottom-up death (an edge into a node whose branches are all dead
cannot reach the output). `derive` turns an alive mask into a `TreeCell` that is always a valid
tree. This module needs numpy only (matplotlib is imported inside `plot`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from bnas_jax.search_space import spaces

FORMAT_VERSION = 1
KIND = "tree_cell"  # the "kind" field of a tree cell's JSON (cell-search genotypes have none)

ROOT_OP = "gconv_3x3"  # the root edges: BN -> ReLU -> 3 x 3 conv, groups G, the block stride
# The seven candidates of every non-root edge (spec 2.4), in switch order.
EDGE_OPS = ("sep_3x3", "sep_5x5", "sep_7x7", "conv_1x1", "identity", "max_pool_3x3",
            "avg_pool_3x3")
# Ops that can change the number of channels (the others need C_in == C_out).
WIDTH_CHANGING_OPS = ("sep_3x3", "sep_5x5", "sep_7x7", "conv_1x1", ROOT_OP)
MERGES = ("add", "concat", "none")
ALLOCATIONS = ("copy", "split", "none")
SHORT = {"sep_3x3": "S3", "sep_5x5": "S5", "sep_7x7": "S7", "conv_1x1": "C1", "identity": "Id",
         "max_pool_3x3": "Pm", "avg_pool_3x3": "Pa", ROOT_OP: "G3"}


def split_sizes(width: int, parts: int) -> tuple[int, ...]:
  """Channel slices of a split: ``floor(width / parts)`` each, the first ``width % parts`` one
  more (spec 2.2)."""
  base, extra = divmod(int(width), int(parts))
  return tuple(base + (1 if i < extra else 0) for i in range(parts))


@dataclasses.dataclass(frozen=True)
class Branch:
  """One branch of a node: the edge ops (outputs summed) and the child node (None = leaf).

  Attributes:
    ops: one or more op names (`EDGE_OPS`, or `ROOT_OP` on root edges), no duplicates.
    child: the node below the edge, or None.
  """
  ops: tuple[str, ...]
  child: Optional["TreeNode"] = None

  def __post_init__(self):
    ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
    if not ops or len(set(ops)) != len(ops):
      raise ValueError(f"Branch: ops must be one or more distinct op names, got {self.ops!r}")
    object.__setattr__(self, "ops", ops)


@dataclasses.dataclass(frozen=True)
class TreeNode:
  """An internal node: allocation, merge and branches (spec 2.2).

  Raises:
    ValueError: an unknown merge/allocation, ``none`` with other than one branch, add/concat with
      fewer than two, ``split`` with a merge other than concat, or ``copy`` with merge none.
  """
  merge: str
  allocation: str
  branches: tuple[Branch, ...]

  def __post_init__(self):
    object.__setattr__(self, "branches", tuple(self.branches))
    if self.merge not in MERGES or self.allocation not in ALLOCATIONS:
      raise ValueError(f"TreeNode: merge {self.merge!r} / allocation {self.allocation!r}; use "
                       f"merge in {MERGES} and allocation in {ALLOCATIONS}")
    n = len(self.branches)
    if (self.merge == "none") != (n == 1) or (self.allocation == "none") != (n == 1):
      raise ValueError(f"TreeNode: merge/allocation 'none' go with exactly one branch and only "
                       f"then (got merge {self.merge!r}, allocation {self.allocation!r}, "
                       f"{n} branches)")
    if self.allocation == "split" and self.merge != "concat":
      raise ValueError("TreeNode: a split allocation needs a concat merge (spec 2.3)")
    for b in self.branches:
      if not isinstance(b, Branch):
        raise ValueError(f"TreeNode: branches must be Branch objects, got {type(b).__name__}")


def node(merge: str, *branches: Branch, allocation: str | None = None) -> TreeNode:
  """Shorthand: a node whose allocation follows its merge (add -> copy, concat -> split)."""
  alloc = allocation or {"add": "copy", "concat": "split", "none": "none"}[merge]
  return TreeNode(merge, alloc, tuple(branches))


def leaf(*ops: str) -> Branch:
  """Shorthand: a leaf branch with `ops`."""
  return Branch(tuple(ops), None)


def edge(ops: Union[str, Sequence[str]], child: TreeNode) -> Branch:
  """Shorthand: a branch with `ops` into `child`."""
  return Branch((ops,) if isinstance(ops, str) else tuple(ops), child)


@dataclasses.dataclass(frozen=True)
class TreeCell:
  """A tree cell (the genotype of the proxyless search).

  Attributes:
    root: the root node; its branches' ops are ``(ROOT_OP,)``.
    space: ``'tree'`` (the registry name of the search space; kept for JSON files).

  Raises:
    ValueError: a root edge other than `ROOT_OP`, a non-root edge op not in `EDGE_OPS`, or a
      width-preserving op (identity, pools) on an edge that changes the channel count (a
      concat-copy node's branches). The message names the edge by its path (R1, R12, ...).
  """
  root: TreeNode
  space: str = "tree"

  def __post_init__(self):
    if not isinstance(self.root, TreeNode):
      raise ValueError(f"TreeCell: root must be a TreeNode, got {type(self.root).__name__}")
    for path, _, br, depth in self.edges():
      allowed = (ROOT_OP,) if depth == 1 else EDGE_OPS
      bad = [op for op in br.ops if op not in allowed]
      if bad:
        raise ValueError(f"TreeCell: edge {path} has op(s) {bad}; "
                         + ("root edges are the block's grouped conv "
                            f"{ROOT_OP!r}" if depth == 1 else f"use ops from {EDGE_OPS}"))
    for path, c_in, c_out, ops in self.edge_widths(64 * 3 * 5 * 7):
      if c_in != c_out and any(op not in WIDTH_CHANGING_OPS for op in ops):
        raise ValueError(f"TreeCell: edge {path} maps {c_in} to {c_out} channels (a concat-copy "
                         f"branch), which {ops} cannot; use a conv/sep op there or split "
                         "allocation")

  # ---- structure ------------------------------------------------------------------------------
  def edges(self) -> Iterator[tuple[str, TreeNode, Branch, int]]:
    """Depth-first ``(path, parent node, branch, depth)``; R1 = first root branch, R12 its second
    child's branch, ...; depth 1 = root edges."""
    def walk(n: TreeNode, path: str, depth: int):
      for i, b in enumerate(n.branches):
        p = f"{path}{i + 1}"
        yield p, n, b, depth
        if b.child is not None:
          yield from walk(b.child, p, depth + 1)
    yield from walk(self.root, "R", 1)

  def nodes(self) -> Iterator[tuple[str, TreeNode, int]]:
    """Depth-first ``(path, node, depth)``, the root first (path R, depth 0)."""
    yield "R", self.root, 0
    for path, _, b, depth in self.edges():
      if b.child is not None:
        yield path, b.child, depth

  @property
  def depth(self) -> int:
    """Number of edges on the longest root-to-leaf path."""
    return max(d for _, _, _, d in self.edges())

  @property
  def num_edges(self) -> int:
    return sum(1 for _ in self.edges())

  def edge_widths(self, width: int) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """``[(path, C_in, C_out, ops)]`` for a cell of `width` channels (spec 2.2 bookkeeping).

    copy: every branch gets the node's width; split: the `split_sizes`. add: every branch outputs
    the node's width; concat: the split sizes. A child node has the width of its edge output.
    """
    out = []

    def walk(n: TreeNode, path: str, w: int):
      sizes = split_sizes(w, len(n.branches))
      for i, b in enumerate(n.branches):
        c_in = sizes[i] if n.allocation == "split" else w
        c_out = sizes[i] if n.merge == "concat" else w
        out.append((f"{path}{i + 1}", c_in, c_out, b.ops))
        if b.child is not None:
          walk(b.child, f"{path}{i + 1}", c_out)
    walk(self.root, "R", int(width))
    return out

  # ---- serialisation --------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    def enc(n: TreeNode):
      return {"merge": n.merge, "allocation": n.allocation,
              "branches": [{"ops": list(b.ops), "child": None if b.child is None else enc(b.child)}
                           for b in n.branches]}
    return {"format_version": FORMAT_VERSION, "kind": KIND, "space": self.space,
            "root": enc(self.root)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TreeCell":
    """Inverse of `to_dict`.

    Raises:
      ValueError: not a tree-cell object, an unsupported format_version or a malformed node.
    """
    if not isinstance(d, Mapping) or d.get("kind") != KIND:
      raise ValueError(f"a tree-cell JSON is an object with \"kind\": \"{KIND}\" and a root "
                       f"node; got {str(d)[:120]}")
    if d.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"unsupported tree-cell format_version {d.get('format_version')!r} "
                       f"(this code reads version {FORMAT_VERSION})")

    def dec(n, path):
      try:
        return TreeNode(n["merge"], n["allocation"], tuple(
            Branch(tuple(b["ops"]), None if b.get("child") is None
                   else dec(b["child"], f"{path}{i + 1}"))
            for i, b in enumerate(n["branches"])))
      except (KeyError, TypeError) as e:
        raise ValueError(f"tree-cell node {path} is malformed ({type(e).__name__}: {e}); a node "
                         "is {\"merge\", \"allocation\", \"branches\": [{\"ops\", \"child\"}]}") from None
    return cls(dec(d.get("root"), "R"), space=str(d.get("space", "tree")))

  def to_json(self, indent: int | None = 1) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, text: str) -> "TreeCell":
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    """Writes the JSON form atomically (temp file in the same folder + ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tree-cell-", suffix=".tmp", dir=folder)
    try:
      with os.fdopen(fd, "w") as f:
        f.write(self.to_json() + "\n")
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  @classmethod
  def load(cls, path: str) -> "TreeCell":
    """Reads a tree-cell JSON file.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not a valid tree-cell JSON (the message names the file).
    """
    with open(path) as f:
      text = f.read()
    try:
      return cls.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path} is not a valid tree-cell JSON file: {e}") from e

  def __str__(self) -> str:
    def fmt(n: TreeNode) -> str:
      parts = []
      for b in n.branches:
        ops = "+".join(SHORT.get(o, o) for o in b.ops)
        parts.append(ops if b.child is None else f"{ops}>{fmt(b.child)}")
      tag = {"add": "add", "concat": "cat", "none": ""}[n.merge]
      return f"{tag}({', '.join(parts)})"
    return f"TreeCell[{fmt(self.root)}]"


# TreeCell-A (spec 3.1, 3.2): 15 edges.
TREE_CELL_A = TreeCell(node(
    "add",
    edge(ROOT_OP, node("add",
                       edge("conv_1x1", node("concat", leaf("avg_pool_3x3"), leaf("sep_7x7"))),
                       edge("max_pool_3x3", node("add", leaf("sep_3x3"), leaf("sep_5x5"))))),
    edge(ROOT_OP, node("add",
                       edge("sep_5x5", node("add", leaf("sep_5x5"), leaf("avg_pool_3x3"),
                                            leaf("avg_pool_3x3"))),
                       edge("sep_3x3", node("add", leaf("avg_pool_3x3"), leaf("sep_3x3")))))))

# TreeCell-B (spec 3.4).
TREE_CELL_B = TreeCell(node(
    "add",
    edge(ROOT_OP, node("add",
                       edge("conv_1x1", node("none", leaf("sep_5x5"))),
                       edge("sep_7x7", node("none", leaf("avg_pool_3x3"))))),
    edge(ROOT_OP, node("add",
                       edge("avg_pool_3x3", node("add", leaf("sep_7x7"), leaf("conv_1x1"))),
                       edge("sep_7x7", node("none", leaf("avg_pool_3x3")))))))

# The plain PyramidNet bottleneck: one grouped 3 x 3 conv, no tree (spec 1.3 step 3).
PLAIN_CELL = TreeCell(node("none", leaf(ROOT_OP)))

NAMED_TREE_CELLS = {"tree_cell_a": TREE_CELL_A, "tree_cell_b": TREE_CELL_B, "plain": PLAIN_CELL}


def is_tree_cell_json(path: str) -> bool:
  """True if `path` is a readable JSON file whose object has ``"kind": "tree_cell"``."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(d, dict) and d.get("kind") == KIND


def load_tree_cell(name_or_path: Union[str, TreeCell]) -> TreeCell:
  """A `TreeCell`, a registered name (`NAMED_TREE_CELLS`) or the path of a tree-cell JSON file.

  Raises:
    ValueError: neither a registered name nor an existing file, or an invalid file.
  """
  if isinstance(name_or_path, TreeCell):
    return name_or_path
  if name_or_path in NAMED_TREE_CELLS:
    return NAMED_TREE_CELLS[name_or_path]
  if isinstance(name_or_path, str) and os.path.isfile(name_or_path):
    return TreeCell.load(name_or_path)
  raise ValueError(f"{name_or_path!r} is neither a registered tree cell "
                   f"({sorted(NAMED_TREE_CELLS)}) nor an existing tree-cell JSON file")


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


# --------------------------------------------------------------------------------------------------
# Pictures.
# --------------------------------------------------------------------------------------------------


def plot(cell: TreeCell, path_prefix: str, title: str | None = None) -> tuple[str, str]:
  """Draws `cell` top-down and writes ``<path_prefix>.png`` and ``<path_prefix>.svg``.

  The cell input enters the root at the top; every edge is an arrow labelled with its op(s)
  (several ops are summed); internal nodes are boxes labelled with their merge (``add`` = mean of
  the branches, ``concat``, ``none``); leaves are dots whose output returns to the parent's merge;
  the root's merge is the cell output. Matplotlib, Agg backend.

  Returns:
    The PNG and SVG paths.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  pos: dict[str, tuple[float, float]] = {}
  counter = [0]

  def place(n: Optional[TreeNode], path: str, depth: int) -> float:
    if n is None:
      x = 1.4 * counter[0]  # leaves 1.4 units apart: the labels of a 3-branch node stay apart
      counter[0] += 1
    else:
      xs = [place(b.child, f"{path}{i + 1}", depth + 1) for i, b in enumerate(n.branches)]
      x = sum(xs) / len(xs)
    pos[path] = (x, -1.6 * depth)
    return x

  place(cell.root, "R", 0)
  n_leaves = counter[0]
  fig, ax = plt.subplots(figsize=(max(4.0, 2.0 * n_leaves + 1.0), 1.6 * (cell.depth + 1) + 1.2))
  for path, parent, b, _ in cell.edges():
    (x0, y0), (x1, y1) = pos[path[:-1]], pos[path]
    color = "tab:red" if b.ops == (ROOT_OP,) else "tab:blue"
    ax.annotate("", xy=(x1, y1 + 0.25), xytext=(x0, y0 - 0.25),
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.4))
    label = "\n".join(b.ops)
    ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, ha="center", va="center", fontsize=7,
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=color, lw=0.8))
  for path, n, _ in cell.nodes():
    x, y = pos[path]
    label = {"add": "add (mean)", "concat": "concat", "none": "none"}[n.merge]
    if n.allocation == "split":
      label += "\n(split)"
    ax.text(x, y, f"{path}: {label}", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round,pad=0.3", fc="palegreen" if path == "R" else "lightskyblue",
                      ec="black"))
  for path, _, b, _ in cell.edges():
    if b.child is None:
      x, y = pos[path]
      ax.plot([x], [y], "o", color="0.3", ms=6)
  x_r, y_r = pos["R"]
  ax.text(x_r, y_r + 0.9, "cell input (C channels) -> root; root merge = cell output",
          ha="center", va="center", fontsize=8)
  ax.set_xlim(-1.0, 1.4 * max(n_leaves - 1, 1) + 1.0)
  ax.set_ylim(-1.6 * cell.depth - 0.8, 1.4)
  ax.axis("off")
  ax.set_title(title or f"tree cell: {cell}", fontsize=9)
  fig.tight_layout()
  prefix = os.fspath(path_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  paths = (prefix + ".png", prefix + ".svg")
  try:
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
  finally:
    plt.close(fig)
  return paths


spaces.SPACES.setdefault("tree", make_space("tree"))
# A small template for smoke tests and CI: one root edge, one branch below it, two leaves under
# that (3 searched edges; the depth-3 top-down / bottom-up rules still apply).
spaces.SPACES.setdefault("tree_tiny", make_space("tree_tiny", TreeTemplate((1, 1, 2))))
