"""Search spaces as data: cell topologies, candidate-op lists and the switch layout.

A search space is a frozen description, not code. Every other module (supernet, HARD prior,
curvature, genotype derivation) reads the same `SearchSpace` object.

Node numbering (shared by all spaces and by `bnas_jax.genotype.Genotype`):

* ``bayesnas`` and ``darts``: node 0 = c_{k-2} (the cell before the previous one; ``in1`` in the
  original BayesNAS code), node 1 = c_{k-1} (the previous cell; ``in0``), nodes 2..5 = the four
  intermediate nodes (``n0..n3``). The cell output concatenates nodes 2..5 along channels.
* ``nb201``: node 0 = the cell input, nodes 1..3 intermediate; the cell output is node 3.

Switch layout (spec section 3.3, 11): for each cell type ``tau`` (``'normal'``, ``'reduce'``) the
switches are one array ``f32[n_cells_tau, E, 1 + n_ops]``. Index 0 on the last axis is the edge's
*origin* switch; index ``1 + i`` is the switch of candidate op ``ops[i]``. The copies of one
(cell type, edge, switch) across the cells of that type, ``switches[tau][:, e, k]``, form one group
g = (tau, e, k) of the group-ARD prior. Group-level quantities (gamma, omega, the alive mask) are
``[E, 1 + n_ops]`` per cell type.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

ORIGIN = 0  # index of the origin switch on the last switch axis


@dataclasses.dataclass(frozen=True)
class Edge:
  """One edge of a cell: ``source -> target`` (node ids as in the module docstring).

  Attributes:
    name: the edge's name (BayesNAS code names such as ``in1_3``, or ``"{source}->{target}"``).
    source: source node id.
    target: target node id.
  """
  name: str
  source: int
  target: int


@dataclasses.dataclass(frozen=True)
class CellTopology:
  """The DAG of one cell type.

  Attributes:
    num_inputs: number of input nodes (2 for bayesnas/darts, 1 for nb201).
    num_nodes: number of intermediate nodes (4 everywhere).
    edges: the searched edges, in switch order (axis 1 of the switch array).
    concat: node ids concatenated into the cell output (a single id means "output = that node").
    reduction: whether edges leaving input nodes have stride 2.
  """
  num_inputs: int
  num_nodes: int
  edges: tuple[Edge, ...]
  concat: tuple[int, ...]
  reduction: bool = False

  def stride(self, edge: Edge) -> int:
    """Stride of the ops on `edge`: 2 for edges leaving an input node of a reduction cell."""
    return 2 if (self.reduction and edge.source < self.num_inputs) else 1

  def edges_into(self, target: int) -> tuple[int, ...]:
    """Indices (into `edges`) of the edges that end in node `target`."""
    return tuple(i for i, e in enumerate(self.edges) if e.target == target)

  @property
  def node_ids(self) -> tuple[int, ...]:
    return tuple(range(self.num_inputs, self.num_inputs + self.num_nodes))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A search space: op family, candidate ops and the cell topology per cell type.

  Attributes:
    name: registry name (``bayesnas``, ``darts``, ``nb201``).
    family: which op definitions to use (key of ``bnas_jax.models.ops.OPS``).
    ops: the candidate ops carrying a switch, in switch order (axis 2 index 1..). The "zero" op is
      never listed: an edge is zero when its origin switch is pruned (spec 3.1-3.3).
    cells: cell topology per cell type, e.g. ``{'normal': ..., 'reduce': ...}``; nb201 has only
      ``'normal'`` (its stage transitions are fixed residual blocks, not searched).
  """
  name: str
  family: str
  ops: tuple[str, ...]
  cells: Mapping[str, CellTopology]

  def __hash__(self):
    return hash((self.name, self.family, self.ops, tuple(sorted(self.cells.items()))))

  @property
  def cell_types(self) -> tuple[str, ...]:
    return tuple(self.cells)

  @property
  def num_switches_per_edge(self) -> int:
    """1 origin switch + one switch per candidate op."""
    return 1 + len(self.ops)

  def group_shape(self, cell_type: str) -> tuple[int, int]:
    """Shape ``(E, 1 + n_ops)`` of group-level arrays (gamma, omega, mask) of `cell_type`."""
    return (len(self.cells[cell_type].edges), self.num_switches_per_edge)

  def switch_shapes(self, cell_counts: Mapping[str, int]) -> dict[str, tuple[int, int, int]]:
    """Shapes of the switch arrays, ``{tau: (n_cells_tau, E, 1 + n_ops)}``.

    Raises:
      ValueError: if `cell_counts` names a cell type this space does not have.
    """
    unknown = set(cell_counts) - set(self.cells)
    if unknown:
      raise ValueError(f"cell types {sorted(unknown)} are not in search space {self.name!r} "
                       f"(it has {list(self.cells)})")
    return {t: (int(n), *self.group_shape(t)) for t, n in cell_counts.items() if n > 0}

  def switch_name(self, k: int) -> str:
    """Name of switch index `k` on the last axis: ``'origin'`` or the op name."""
    return "origin" if k == ORIGIN else self.ops[k - 1]


def _bayesnas_space() -> SearchSpace:
  # Spec 2.2. Node ids: 0 = in1 (k-2), 1 = in0 (k-1), 2..5 = n0..n3.
  # The original *search* network feeds edge in1_3 with in0 (spec 9.3, a bug); its Hessian pass and
  # the released cells treat it as fed by in1 (k-2). We use in1, as the released cells do.
  normal = (
      Edge("in0_0", 1, 2), Edge("in1_0", 0, 2),
      Edge("in0_1", 1, 3), Edge("in1_1", 0, 3),
      Edge("in0_2", 1, 4), Edge("in1_2", 0, 4),
      Edge("in1_3", 0, 5), Edge("sel_0_3", 2, 5),
  )
  reduce = (
      Edge("in0_0", 1, 2), Edge("in1_0", 0, 2),
      Edge("in1_1", 0, 3), Edge("sel_0_1", 2, 3),
      Edge("in1_2", 0, 4), Edge("sel_0_2", 2, 4),
      Edge("in1_3", 0, 5), Edge("sel_0_3", 2, 5),
  )
  concat = (2, 3, 4, 5)
  return SearchSpace(
      name="bayesnas", family="bayesnas",
      ops=("sep3", "sep5", "dil3", "dil5", "max", "avg", "ident"),
      cells={"normal": CellTopology(2, 4, normal, concat, reduction=False),
             "reduce": CellTopology(2, 4, reduce, concat, reduction=True)})


def _darts_space() -> SearchSpace:
  edges = tuple(Edge(f"{s}->{t}", s, t) for t in range(2, 6) for s in range(t))
  concat = (2, 3, 4, 5)
  return SearchSpace(
      name="darts", family="darts",
      ops=("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
           "dil_conv_3x3", "dil_conv_5x5"),
      cells={"normal": CellTopology(2, 4, edges, concat, reduction=False),
             "reduce": CellTopology(2, 4, edges, concat, reduction=True)})


def _nb201_space() -> SearchSpace:
  # Edge order = the order of the standard arch string |op~0|+|op~0|op~1|+|op~0|op~1|op~2|.
  edges = tuple(Edge(f"{s}->{t}", s, t) for t in range(1, 4) for s in range(t))
  return SearchSpace(
      name="nb201", family="nb201",
      ops=("skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"),
      cells={"normal": CellTopology(1, 3, edges, (3,), reduction=False)})


SPACES: dict[str, SearchSpace] = {s.name: s for s in (_bayesnas_space(), _darts_space(),
                                                       _nb201_space())}


def get_space(name: str) -> SearchSpace:
  """Returns the registered search space `name`.

  Raises:
    ValueError: naming the unknown space and the registered ones.
  """
  try:
    return SPACES[name]
  except KeyError:
    raise ValueError(f"unknown search space {name!r}; choose one of {sorted(SPACES)}") from None


# A hashable, static form of the alive mask: ((cell_type, ((bool, ...), ...)), ...).
FrozenMask = tuple[tuple[str, tuple[tuple[bool, ...], ...]], ...]


def full_mask(space: SearchSpace) -> dict[str, np.ndarray]:
  """All-alive group mask ``{tau: bool[E, 1 + n_ops]}``."""
  return {t: np.ones(space.group_shape(t), bool) for t in space.cells}


def freeze_mask(mask: Mapping[str, np.ndarray]) -> FrozenMask:
  """Converts a group mask ``{tau: bool[E, K]}`` to a hashable static value (a jit/Module attribute).

  Changing the mask therefore recompiles the supernet; that happens at most once per outer
  iteration and is what makes a pruned op cost no compute.
  """
  return tuple((t, tuple(tuple(bool(v) for v in row) for row in np.asarray(m)))
               for t, m in sorted(mask.items()))


def thaw_mask(frozen: FrozenMask) -> dict[str, np.ndarray]:
  """Inverse of `freeze_mask`."""
  return {t: np.array(rows, dtype=bool) for t, rows in frozen}


# The tree-cell space of the proxyless search ('tree'): bnas_jax.search_space.tree builds on the
# types above and registers itself in SPACES when imported.
from bnas_jax.search_space import tree as _tree  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
