"""The genotype data type: a derived cell per cell type as ``(target, source, op)`` triples, JSON I/O.

A `Genotype` lists, per cell type, the surviving ``(target, source, op)`` triples (node ids of
`bnas_jax.search_space.spaces`: bayesnas/darts 0 = c_{k-2}, 1 = c_{k-1}, 2..5 intermediate;
nb201 0 = input, 1..3 intermediate, output = node 3) and the intermediate nodes that form the cell
output. Several ops on one edge are allowed and are summed (BayesNAS keeps them, spec 5 / 8.3).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import operator
from typing import Any, Mapping, Sequence, Union

import numpy as np

from bnas_jax import files
from bnas_jax.search_space import spaces

FORMAT_VERSION = 1
CELL_TYPES = ("normal", "reduce")

Triple = tuple[int, int, str]  # (target, source, op)

DartsGenotype = collections.namedtuple("DartsGenotype", "normal normal_concat reduce reduce_concat")
DartsGenotype.__doc__ = """The DARTS genotype format: ``normal``/``reduce`` are lists of (op, input)
pairs, two per intermediate node 2..5 in node order; ``*_concat`` the concatenated node ids."""


def _space(space: Union[str, spaces.SearchSpace]) -> spaces.SearchSpace:
  return spaces.get_space(space) if isinstance(space, str) else space


def _int(value: Any, what: str) -> int:
  """`operator.index` (Python or numpy ints; bools rejected) with a clear error."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be an int, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{what} must be an int, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A derived architecture: surviving ops per cell type.

  Attributes:
    space: search-space name (``'bayesnas'``, ``'darts'``, ``'nb201'``); fixes node ids, edges and
      op names (``spaces.get_space(space).ops``).
    normal: sorted tuple of ``(target, source, op)`` triples of the normal cell.
    reduce: same for the reduction cell; empty for nb201 (no searched reduction cell).
    normal_concat: sorted intermediate node ids whose outputs form the cell output (channel
      concat for bayesnas/darts; for nb201 ``(3,)`` = "output is node 3", or ``()`` when node 3 has
      no input, i.e. the cell outputs zeros).
    reduce_concat: same for the reduction cell.

  The constructor normalises lists to sorted tuples and validates.

  Raises:
    ValueError: unknown space or op, node id out of range, ``source >= target``, an edge that is not
      in the space's cell topology, a duplicated triple, or a concat node that is not an output
      candidate of the space or has no input edge. The message names the bad item.
  """
  space: str
  normal: tuple[Triple, ...]
  reduce: tuple[Triple, ...]
  normal_concat: tuple[int, ...]
  reduce_concat: tuple[int, ...]

  def __post_init__(self):
    try:
      space = spaces.get_space(self.space)
    except (ValueError, TypeError):
      raise ValueError(f"Genotype: unknown space {self.space!r}; choose one of "
                       f"{sorted(spaces.SPACES)}") from None
    for cell_type in CELL_TYPES:
      triples = getattr(self, cell_type)
      concat = getattr(self, f"{cell_type}_concat")
      if cell_type not in space.cells:
        if len(triples) or len(concat):
          raise ValueError(f"Genotype: space {self.space!r} has no {cell_type!r} cell, so "
                           f"{cell_type} and {cell_type}_concat must be empty")
        object.__setattr__(self, cell_type, ())
        object.__setattr__(self, f"{cell_type}_concat", ())
        continue
      triples = _check_triples(space, cell_type, triples)
      concat = _check_concat(space, cell_type, triples, concat)
      object.__setattr__(self, cell_type, triples)
      object.__setattr__(self, f"{cell_type}_concat", concat)

  # ---- views ---------------------------------------------------------------------------------
  @property
  def search_space(self) -> spaces.SearchSpace:
    return spaces.get_space(self.space)

  @property
  def cell_types(self) -> tuple[str, ...]:
    """Cell types of the space (``('normal', 'reduce')`` or ``('normal',)``)."""
    return self.search_space.cell_types

  def cell(self, cell_type: str) -> tuple[Triple, ...]:
    """The triples of `cell_type`."""
    if cell_type not in CELL_TYPES:
      raise ValueError(f"unknown cell type {cell_type!r}; choose one of {CELL_TYPES}")
    return getattr(self, cell_type)

  def concat(self, cell_type: str) -> tuple[int, ...]:
    """The output node ids of `cell_type`."""
    self.cell(cell_type)
    return getattr(self, f"{cell_type}_concat")

  def edge_ops(self, cell_type: str) -> dict[tuple[int, int], tuple[str, ...]]:
    """``{(source, target): (op, ...)}`` of `cell_type`, ops in the space's op order."""
    order = {op: i for i, op in enumerate(self.search_space.ops)}
    out = collections.defaultdict(list)
    for target, source, op in self.cell(cell_type):
      out[(source, target)].append(op)
    return {e: tuple(sorted(ops, key=order.__getitem__)) for e, ops in sorted(out.items())}

  def num_ops(self, cell_type: str) -> int:
    return len(self.cell(cell_type))

  def is_empty(self, cell_type: str) -> bool:
    """True when `cell_type` has no output node (no op reaches the output)."""
    return not self.concat(cell_type)

  def check_buildable(self) -> None:
    """Raises if a network cannot be built from this genotype.

    A bayesnas/darts cell whose output concatenates no node has zero channels, so it cannot be
    built (`derive` returns such a cell only when every op of the cell was pruned and no scores
    were given). An empty nb201 cell is the valid all-``none`` cell (output = zeros).

    Raises:
      ValueError: naming the empty cell type and how to avoid it.
    """
    for cell_type in self.cell_types:
      if self.is_empty(cell_type) and self.space != "nb201":
        raise ValueError(
            f"the {cell_type} cell of this {self.space} genotype is empty (every op was pruned): "
            "a network cannot be built from it. Prune less (lower the threshold / lambda) or "
            "derive with scores=... so that the best op per node is kept as a fallback.")

  # ---- serialisation -------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "space": self.space,
            "normal": [list(t) for t in self.normal], "normal_concat": list(self.normal_concat),
            "reduce": [list(t) for t in self.reduce], "reduce_concat": list(self.reduce_concat)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Genotype":
    """Inverse of `to_dict`.

    Raises:
      ValueError: missing fields or an unsupported ``format_version``.
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"a genotype JSON must be an object with the fields space, normal, reduce, "
                       f"normal_concat, reduce_concat; got a {type(d).__name__}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(f"unsupported genotype format_version {version!r} "
                       f"(this code reads version {FORMAT_VERSION})")
    missing = [k for k in ("space", "normal", "reduce", "normal_concat", "reduce_concat")
               if k not in d]
    if missing:
      raise ValueError(f"genotype JSON lacks the field(s) {missing}")
    return cls(space=d["space"], normal=tuple(tuple(t) for t in d["normal"]),
               reduce=tuple(tuple(t) for t in d["reduce"]),
               normal_concat=tuple(d["normal_concat"]), reduce_concat=tuple(d["reduce_concat"]))

  def to_json(self, indent: int | None = 1) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, text: str) -> "Genotype":
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    """Writes the JSON form atomically (`bnas_jax.files.write_text_atomic`)."""
    files.write_text_atomic(path, self.to_json() + "\n")

  @classmethod
  def load(cls, path: str) -> "Genotype":
    """Reads a genotype JSON file (as written by `save`).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not valid genotype JSON; the message names the file.
    """
    with open(path) as f:
      text = f.read()
    try:
      return cls.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path} is not a valid genotype JSON file: {e}") from e

  def __str__(self) -> str:
    parts = [f"Genotype[{self.space}]"]
    for cell_type in self.cell_types:
      nodes = collections.defaultdict(list)
      for (source, target), ops in self.edge_ops(cell_type).items():
        nodes[target].append(f"{'+'.join(ops)}({_node_label(self.space, source)})")
      body = "; ".join(f"{_node_label(self.space, t)} <- {' + '.join(v)}"
                       for t, v in sorted(nodes.items())) or "(empty)"
      outs = ", ".join(_node_label(self.space, n) for n in self.concat(cell_type))
      parts.append(f"  {cell_type}: {body}; out = [{outs}]")
    return "\n".join(parts)


def _check_triples(space: spaces.SearchSpace, cell_type: str, triples) -> tuple[Triple, ...]:
  topo = space.cells[cell_type]
  num_all = topo.num_inputs + topo.num_nodes
  edges = {(e.source, e.target) for e in topo.edges}
  out = []
  if isinstance(triples, (str, bytes)) or not isinstance(triples, (Sequence, set, frozenset)):
    raise ValueError(f"Genotype.{cell_type} must be a sequence of (target, source, op) triples, "
                     f"got {triples!r}")
  for raw in triples:
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__") or len(raw) != 3:
      raise ValueError(f"Genotype.{cell_type}: {raw!r} is not a (target, source, op) triple")
    target = _int(raw[0], f"Genotype.{cell_type} triple {raw!r}: target")
    source = _int(raw[1], f"Genotype.{cell_type} triple {raw!r}: source")
    op = raw[2]
    triple = (target, source, op)
    if not isinstance(op, str) or op not in space.ops:
      raise ValueError(f"Genotype.{cell_type}: unknown op {op!r} in {triple} for space "
                       f"{space.name!r}; ops are {list(space.ops)}")
    if not topo.num_inputs <= target < num_all:
      raise ValueError(f"Genotype.{cell_type}: target {target} of {triple} is not an "
                       f"intermediate node of {space.name!r} ({list(topo.node_ids)})")
    if not 0 <= source < num_all:
      raise ValueError(f"Genotype.{cell_type}: source {source} of {triple} is out of range "
                       f"0..{num_all - 1}")
    if source >= target:
      raise ValueError(f"Genotype.{cell_type}: source {source} >= target {target} in {triple}; "
                       "cells are DAGs with edges from lower to higher node ids")
    if (source, target) not in edges:
      raise ValueError(f"Genotype.{cell_type}: edge {source}->{target} of {triple} is not in the "
                       f"{cell_type} cell of space {space.name!r}")
    out.append(triple)
  dup = [t for t, c in collections.Counter(out).items() if c > 1]
  if dup:
    raise ValueError(f"Genotype.{cell_type}: duplicated triple(s) {dup}")
  return tuple(sorted(out))


def _check_concat(space, cell_type, triples, concat) -> tuple[int, ...]:
  topo = space.cells[cell_type]
  if isinstance(concat, (str, bytes)) or not hasattr(concat, "__iter__"):
    raise ValueError(f"Genotype.{cell_type}_concat must be a sequence of node ids, got {concat!r}")
  ids = [_int(c, f"Genotype.{cell_type}_concat entry {c!r}") for c in concat]
  if len(set(ids)) != len(ids):
    raise ValueError(f"Genotype.{cell_type}_concat {tuple(ids)} repeats a node")
  with_input = {t for t, _, _ in triples}
  for c in ids:
    if c not in topo.concat:
      raise ValueError(f"Genotype.{cell_type}_concat: node {c} cannot be an output node of "
                       f"space {space.name!r} (allowed {list(topo.concat)})")
    if c not in with_input:
      raise ValueError(f"Genotype.{cell_type}_concat: node {c} has no input edge in "
                       f"{cell_type}, so it cannot be part of the cell output")
  return tuple(sorted(ids))


def _node_label(space: str, node: int) -> str:
  if space == "nb201":
    return "in" if node == 0 else f"n{node}"
  if node < 2:
    return ("c_{k-2}", "c_{k-1}")[node]
  return f"n{node - 2}"
