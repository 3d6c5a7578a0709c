"""Tree cells as data: the path-level cell type, TreeCell-A/B, JSON (search side: tree_space).

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

The search side (spec 4.3-4.4: the supernet template, its switch layout, `derive`) is
`bnas_jax.search_space.tree_space`, the pictures (`plot`) `bnas_jax.search_space.tree_pictures`;
their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

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
    """Writes the JSON form atomically (`bnas_jax.files.write_text_atomic`)."""
    files.write_text_atomic(path, self.to_json() + "\n")

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


# The search side and the pictures live in their own modules; their public names are re-exported
# here (imported last: they build on the types above).
# pylint: disable=g-import-not-at-top,wrong-import-position
from bnas_jax import files
from bnas_jax.search_space.tree_space import (  # noqa: E402,F401
    CELL_TYPE, TemplateEdge, TreeSearchSpace, TreeTemplate, check_valid, derive, is_tree_space,
    make_space)
from bnas_jax.search_space.tree_pictures import plot  # noqa: E402,F401
