"""Genotype conversions: the DARTS ``Genotype`` namedtuple and NAS-Bench-201 arch strings.

`to_darts` / `from_darts` (``Genotype(normal, normal_concat, reduce, reduce_concat)`` with
(op, input) pairs, two per node) and `to_nb201_string` / `from_nb201_string` (``none`` edges are
absent from the genotype).
"""

from __future__ import annotations

from typing import Any

from bnas_jax import nb201
from bnas_jax.genotype.cell import CELL_TYPES, DartsGenotype, Genotype


def to_darts(genotype: Genotype) -> DartsGenotype:
  """Genotype -> DARTS namedtuple (pairs in node order, within a node in (source, op) order).

  Raises:
    ValueError: if the genotype is not of the darts space or a node does not have exactly two
      (op, input) pairs (the DARTS format's fixed in-degree).
  """
  if genotype.space != "darts":
    raise ValueError(f"to_darts needs a 'darts' genotype, got space {genotype.space!r}")
  fields = {}
  for cell_type in CELL_TYPES:
    topo = genotype.search_space.cells[cell_type]
    pairs = []
    for node in topo.node_ids:
      into = [(op, source) for target, source, op in genotype.cell(cell_type) if target == node]
      if len(into) != 2:
        raise ValueError(f"to_darts: node {node} of the {cell_type} cell has {len(into)} input "
                         f"op(s) {into}; the DARTS format needs exactly 2 per node")
      pairs.extend(into)
    fields[cell_type] = pairs
    fields[f"{cell_type}_concat"] = list(genotype.concat(cell_type))
  return DartsGenotype(**fields)


def from_darts(darts_genotype: Any) -> Genotype:
  """DARTS namedtuple (any object with normal, normal_concat, reduce, reduce_concat) -> Genotype.

  The k-th pair of a cell list feeds intermediate node ``2 + k // 2`` (DARTS ``_compile``).

  Raises:
    ValueError: odd-length or over-long op lists, or whatever `Genotype` rejects.
  """
  cells = {}
  for cell_type in CELL_TYPES:
    pairs = list(getattr(darts_genotype, cell_type))
    if len(pairs) % 2 or len(pairs) > 8:
      raise ValueError(f"from_darts: {cell_type} must hold 2 (op, input) pairs per node for up to "
                       f"4 nodes, got {len(pairs)} pairs")
    triples = []
    for k, pair in enumerate(pairs):
      if len(pair) != 2:
        raise ValueError(f"from_darts: {cell_type}[{k}] = {pair!r} is not an (op, input) pair")
      op, source = pair
      triples.append((2 + k // 2, source, op))
    cells[cell_type] = tuple(triples)
  return Genotype(space="darts", normal=cells["normal"], reduce=cells["reduce"],
                  normal_concat=tuple(darts_genotype.normal_concat),
                  reduce_concat=tuple(darts_genotype.reduce_concat))


def to_nb201_string(genotype: Genotype) -> str:
  """nb201 Genotype -> arch string (absent edges are ``none``).

  Raises:
    ValueError: for a non-nb201 genotype or an edge with more than one op.
  """
  if genotype.space != "nb201":
    raise ValueError(f"to_nb201_string needs an 'nb201' genotype, got space {genotype.space!r}")
  edge_ops = {}
  for edge, ops in genotype.edge_ops("normal").items():
    if len(ops) != 1:
      raise ValueError(f"to_nb201_string: edge {edge[0]}->{edge[1]} carries {len(ops)} ops "
                       f"{ops}; NAS-Bench-201 allows exactly one op per edge")
    edge_ops[edge] = ops[0]
  return nb201.format_arch_string(edge_ops)


def from_nb201_string(arch: str) -> Genotype:
  """Arch string -> nb201 Genotype (``none`` edges dropped; concat ``(3,)`` iff node 3 has input).

  Dangling edges (e.g. from a node without input) are kept as written, so this is an exact inverse
  of `to_nb201_string` on all 15,625 cells; use `prune_disconnected` to clean them.
  """
  triples = tuple((t, s, op) for (s, t), op in nb201.parse_arch_string(arch).items()
                  if op != "none")
  concat = (3,) if any(t == 3 for t, _, _ in triples) else ()
  return Genotype(space="nb201", normal=triples, reduce=(), normal_concat=concat, reduce_concat=())
