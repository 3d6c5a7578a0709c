"""Genotypes: derived cells as data, their conversions, derivation from the alive mask, pictures.

A `Genotype` lists, per cell type, the surviving ``(target, source, op)`` triples (node ids of
`bnas_jax.search_space.spaces`: bayesnas/darts 0 = c_{k-2}, 1 = c_{k-1}, 2..5 intermediate;
nb201 0 = input, 1..3 intermediate, output = node 3) and the intermediate nodes that form the cell
output. Several ops on one edge are allowed and are summed (BayesNAS keeps them, spec 5 / 8.3).

Conversions: `to_darts` / `from_darts` (the DARTS ``Genotype(normal, normal_concat, reduce,
reduce_concat)`` namedtuple with (op, input) pairs, two per node) and `to_nb201_string` /
`from_nb201_string` (NAS-Bench-201 arch strings; ``none`` edges are absent from the genotype).

Derivation (spec 3.1 dependency motif, 5 [INF]): `derive` keeps every op whose own switch and whose
edge's origin switch are alive and then repairs connectivity; `derive_darts` is DARTS' top-2 export;
`derive_nb201` picks one op per edge and returns an arch string.

This module needs numpy only (matplotlib is imported inside `plot`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import operator
import os
import tempfile
from typing import Any, Mapping, Sequence, Union

import numpy as np

from bnas_jax import nb201
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
    """Writes the JSON form atomically (temp file in the same folder + ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".genotype-", suffix=".tmp", dir=folder)
    try:
      with os.fdopen(fd, "w") as f:
        f.write(self.to_json())
        f.write("\n")
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

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


# ---------------------------------------------------------------------------------------------
# Connectivity and derivation
# ---------------------------------------------------------------------------------------------


def prune_disconnected(space: Union[str, spaces.SearchSpace], cell_type: str,
                       triples) -> tuple[tuple[Triple, ...], tuple[int, ...]]:
  """Removes ops that cannot carry information from the cell inputs to the cell output.

  Iterated to a fixed point (spec 3.1, dependency motif):
  * an intermediate node without a surviving input edge is dropped with all its outgoing ops;
  * for a single-output space (nb201: output = node 3) ops into a node that cannot reach the
    output are dropped as well. In concat spaces every surviving node is part of the output.

  Args:
    space: the search space (or its name).
    cell_type: ``'normal'`` or ``'reduce'``.
    triples: iterable of ``(target, source, op)``.

  Returns:
    ``(triples, concat)``: the sorted surviving triples and the surviving output nodes.
  """
  space = _space(space)
  topo = space.cells[cell_type]
  kept = set(triples)
  while True:
    live = set(range(topo.num_inputs)) | {t for t, _, _ in kept}
    new = {tr for tr in kept if tr[1] in live}
    if len(topo.concat) == 1:  # single output node: keep only what reaches it
      reach = set(topo.concat)
      for target, source, _ in sorted(new, reverse=True):  # descending target: DAG order
        if target in reach:
          reach.add(source)
      new = {tr for tr in new if tr[0] in reach}
    if new == kept:
      break
    kept = new
  with_input = {t for t, _, _ in kept}
  concat = tuple(n for n in topo.concat if n in with_input)
  return tuple(sorted(kept)), concat


def _check_group(space, arrays, name, dtype) -> dict[str, np.ndarray]:
  if not isinstance(arrays, Mapping):
    raise ValueError(f"{name} must be a mapping {{cell_type: array[E, 1 + n_ops]}}, got "
                     f"{type(arrays).__name__}")
  out = {}
  for cell_type in space.cells:
    if cell_type not in arrays:
      raise ValueError(f"{name} lacks cell type {cell_type!r} (space {space.name!r} has "
                       f"{list(space.cells)})")
    a = np.asarray(arrays[cell_type])
    if a.shape != space.group_shape(cell_type):
      raise ValueError(f"{name}[{cell_type!r}] has shape {a.shape}; expected "
                       f"{space.group_shape(cell_type)} = (edges, 1 origin + {len(space.ops)} ops)")
    out[cell_type] = a.astype(dtype)
  return out


def _fallback_cell(space, cell_type, scores: np.ndarray) -> set[Triple]:
  """One op per intermediate node: the best-scored op among edges from nodes already kept."""
  topo = space.cells[cell_type]
  live = set(range(topo.num_inputs))
  kept = set()
  for node in topo.node_ids:
    best = None
    for e_idx in topo.edges_into(node):
      edge = topo.edges[e_idx]
      if edge.source not in live:
        continue
      for i, op in enumerate(space.ops):
        s = scores[e_idx, 1 + i]
        if np.isfinite(s) and (best is None or s > best[0]):
          best = (s, (node, edge.source, op))
    if best is not None:
      kept.add(best[1])
      live.add(node)
  return kept


def _cap_ops(topo: spaces.CellTopology, ops_alive: np.ndarray, scores: np.ndarray,
             max_ops: int) -> np.ndarray:
  """At most `max_ops` of the alive ops ``bool[E, n_ops]``, greedily by score, kept connected.

  Repeatedly adds the best-scored remaining op whose source is a cell input or a node that
  already has a kept input (ties: edge order, then op order), so no kept op hangs off a dropped
  node and the cap is reached whenever enough connected ops survive.
  """
  order = np.argsort(-np.where(ops_alive, scores, -np.inf).reshape(-1), kind="stable")
  order = [int(i) for i in order if ops_alive.reshape(-1)[i]]
  n_ops = ops_alive.shape[1]
  kept = np.zeros_like(ops_alive)
  live = set(range(topo.num_inputs))
  while kept.sum() < max_ops:
    pick = next((i for i in order if topo.edges[i // n_ops].source in live), None)
    if pick is None:
      break
    order.remove(pick)
    kept[pick // n_ops, pick % n_ops] = True
    live.add(topo.edges[pick // n_ops].target)
  return kept


def derive(space: Union[str, spaces.SearchSpace], alive: Mapping[str, Any],
           scores: Mapping[str, Any] | None = None, max_ops: int = 0) -> Genotype:
  """Derives the BayesNAS cell(s) from the alive mask of the HARD prior (spec 5, 8.3 [INF]).

  An op survives iff its own switch and its edge's origin switch are alive; surviving ops on one
  edge are all kept (summed). Connectivity is then repaired by `prune_disconnected`; the concat
  lists only surviving intermediate nodes.

  Empty cell policy (nothing survives in a cell):
  * with `scores` (the search passes the group gammas before pruning, `bayes.HardPriorState.score`),
    the cell falls back to the single best-scored op per intermediate node, taken in node order
    among edges whose source is an input or an already kept node (so the cell is connected and
    buildable); a warning is logged. Scores that do not rank the ops (all equal, e.g. the gammas
    *after* pruning, which are 0 for every dead group) raise a ValueError instead of returning an
    arbitrary cell;
  * without `scores`, the cell stays empty (concat ``()``), a warning is logged, and
    `Genotype.check_buildable` (to be called by network builders) raises a clear error for
    bayesnas/darts. For nb201 an empty cell is the valid all-``none`` architecture.

  Args:
    space: the search space (or its name).
    alive: ``{tau: bool[E, 1 + n_ops]}``, index 0 = origin switch (spaces.py layout).
    scores: optional ``{tau: f32[E, 1 + n_ops]}``, larger = more important (e.g. gamma); only the
      op columns ``1:`` are used, for the empty-cell fallback and for `max_ops`.
    max_ops: if > 0, at most this many ops per cell, chosen greedily among the survivors: the
      best-scored op whose source node is already connected (a cell input or a node with a kept
      input) is added until `max_ops` ops are kept (ties: edge order, then op order). The
      released BayesNAS cells keep 8-13 ops per cell (spec 5, "derivation rule"); use this when
      the gamma threshold alone leaves more. 0 keeps every surviving op. For single-output cells
      (nb201) use `derive_nb201` instead.

  Returns:
    A `Genotype` whose cells are connected.

  Raises:
    ValueError: a missing cell type, a wrongly shaped array, a negative `max_ops`, `max_ops`
      without `scores`, or an all-pruned cell whose scores do not rank its ops.
  """
  space = _space(space)
  alive = _check_group(space, alive, "alive", bool)
  max_ops = _int(max_ops, "max_ops")
  if max_ops < 0:
    raise ValueError(f"max_ops must be >= 0 (0 = keep every surviving op), got {max_ops}")
  if max_ops and scores is None:
    raise ValueError("max_ops > 0 ranks the surviving ops by score: pass scores (e.g. the group "
                     "gammas) or set max_ops=0")
  if scores is not None:
    scores = _check_group(space, scores, "scores", np.float64)
  cells, concats = {}, {}
  for cell_type, topo in space.cells.items():
    a = alive[cell_type]
    ops_alive = a[:, 1:] & a[:, :1]
    if max_ops and ops_alive.sum() > max_ops:
      ops_alive = _cap_ops(topo, ops_alive, scores[cell_type][:, 1:], max_ops)
    triples = {(topo.edges[e].target, topo.edges[e].source, space.ops[i])
               for e, i in zip(*np.nonzero(ops_alive))}
    triples, concat = prune_disconnected(space, cell_type, triples)
    if not concat:
      if scores is not None:
        op_scores = scores[cell_type][:, 1:]
        finite = op_scores[np.isfinite(op_scores)]
        if finite.size == 0 or np.all(finite == finite[0]):
          raise ValueError(
              f"every op of the {cell_type} cell of {space.name} was pruned and the scores do not "
              f"rank its ops (all equal or non-finite), so no cell can be derived; pass the "
              f"gammas before pruning (HardPriorState.score) or prune less (a lower "
              f"bayes.prune_threshold or a larger lambda)")
        logging.warning("derive: every op of the %s cell of %s was pruned; falling back to the "
                        "best-scored op per node", cell_type, space.name)
        triples, concat = prune_disconnected(space, cell_type,
                                             _fallback_cell(space, cell_type, scores[cell_type]))
      else:
        logging.warning("derive: every op of the %s cell of %s was pruned and no scores were "
                        "given; the cell is empty", cell_type, space.name)
    cells[cell_type], concats[cell_type] = triples, concat
  return Genotype(space=space.name, normal=cells.get("normal", ()), reduce=cells.get("reduce", ()),
                  normal_concat=concats.get("normal", ()),
                  reduce_concat=concats.get("reduce", ()))


def _masked_op_scores(space, scores, alive) -> dict[str, np.ndarray]:
  """``{tau: f64[E, n_ops]}`` op scores, ``-inf`` where the op or its edge's origin is dead."""
  out = {}
  for cell_type in space.cells:
    s = scores[cell_type][:, 1:].copy()
    s[~np.isfinite(s)] = -np.inf
    if alive is not None:
      a = alive[cell_type]
      s[~(a[:, 1:] & a[:, :1])] = -np.inf
    out[cell_type] = s
  return out


def derive_darts(space: Union[str, spaces.SearchSpace], scores: Mapping[str, Any],
                 alive: Mapping[str, Any] | None = None) -> Genotype:
  """DARTS-style export (Liu et al. 2019, `genotype()`): top-2 input edges per node, one op each.

  The strength of an edge is its best op score; each intermediate node keeps its two strongest
  input edges (fewer if it has fewer) and each kept edge its best op. With `alive`, pruned ops
  (own switch or origin dead) are not eligible; if a node then has fewer than two eligible edges,
  the remaining slots are filled by the best of its other edges ignoring `alive` (a warning is
  logged), so the result is always a valid DARTS cell.

  Args:
    space: the search space (the 14-edge ``'darts'`` space; any space works).
    scores: ``{tau: f32[E, 1 + n_ops]}``, larger = stronger; the origin column 0 is ignored.
    alive: optional ``{tau: bool[E, 1 + n_ops]}``.

  Returns:
    A `Genotype` with exactly ``min(2, in-degree)`` input edges per node, concat = all nodes.
  """
  space = _space(space)
  scores = _check_group(space, scores, "scores", np.float64)
  if alive is not None:
    alive = _check_group(space, alive, "alive", bool)
  masked = _masked_op_scores(space, scores, alive)
  raw = _masked_op_scores(space, scores, None)
  cells = {}
  for cell_type, topo in space.cells.items():
    kept = []
    for node in topo.node_ids:
      into = topo.edges_into(node)
      ranked = sorted(into, key=lambda e: -masked[cell_type][e].max())
      chosen = [e for e in ranked if np.isfinite(masked[cell_type][e].max())][:2]
      need = min(2, len(into)) - len(chosen)
      if need > 0:
        logging.warning("derive_darts: node %d of the %s cell has %d alive input edge(s); filling "
                        "with the best pruned edge(s)", node, cell_type, len(chosen))
        rest = sorted((e for e in into if e not in chosen), key=lambda e: -raw[cell_type][e].max())
        chosen += rest[:need]
      for e in chosen:
        s = masked[cell_type][e] if np.isfinite(masked[cell_type][e].max()) else raw[cell_type][e]
        kept.append((node, topo.edges[e].source, space.ops[int(np.argmax(s))]))
    cells[cell_type] = tuple(kept)
  return Genotype(space=space.name, normal=cells.get("normal", ()), reduce=cells.get("reduce", ()),
                  normal_concat=space.cells["normal"].concat,
                  reduce_concat=space.cells["reduce"].concat if "reduce" in space.cells else ())


def derive_nb201(space: Union[str, spaces.SearchSpace], scores: Mapping[str, Any],
                 alive: Mapping[str, Any]) -> str:
  """One op per NAS-Bench-201 edge, as an arch string (for the benchmark lookup).

  Each edge gets its largest-score alive op; ``'none'`` where the edge's origin switch is pruned
  or no op is alive. No connectivity repair: the benchmark holds every string, dangling edges
  included.

  Args:
    space: the ``'nb201'`` space (or its name).
    scores: ``{'normal': f32[6, 5]}`` (origin column ignored).
    alive: ``{'normal': bool[6, 5]}``.

  Raises:
    ValueError: if `space` is not the nb201 space or an array is malformed.
  """
  space = _space(space)
  if space.family != "nb201":
    raise ValueError(f"derive_nb201 needs the nb201 space, got {space.name!r}")
  scores = _check_group(space, scores, "scores", np.float64)
  alive = _check_group(space, alive, "alive", bool)
  masked = _masked_op_scores(space, scores, alive)["normal"]  # -inf = dead or non-finite
  topo = space.cells["normal"]
  edge_ops = {}
  for e_idx, edge in enumerate(topo.edges):
    a = alive["normal"][e_idx]
    candidates = np.flatnonzero(a[1:] & a[0])
    if candidates.size:  # first maximum among the alive ops (non-finite scores rank last)
      best = candidates[int(np.argmax(masked[e_idx, candidates]))]
      edge_ops[(edge.source, edge.target)] = space.ops[best]
  return nb201.format_arch_string(edge_ops)


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------


def _cell_layout(genotype: Genotype, cell_type: str):
  """Edge labels, arc height per unit span and the top y of one cell's drawing."""
  topo = genotype.search_space.cells[cell_type]
  max_span = max(topo.num_inputs + topo.num_nodes - 1, 1)

  def label_of(ops):
    per_line = 2 if max(len(op) for op in ops) <= 5 else 1  # short BayesNAS names: 2 a line
    return "\n".join(" + ".join(ops[i:i + per_line]) for i in range(0, len(ops), per_line))

  edge_labels = {e: label_of(ops) for e, ops in genotype.edge_ops(cell_type).items()}
  max_lines = max([lbl.count("\n") + 1 for lbl in edge_labels.values()], default=1)
  step = max(1.5, 0.45 * max_lines + 0.5)  # arc height per unit span: labels never overlap
  return edge_labels, step, step * max_span + 0.4 * max_lines + 0.5


def _draw_cell(ax, genotype: Genotype, cell_type: str) -> None:
  """Draws one cell as an arc diagram: nodes on a line in topological order, every edge an arc above
  the line (height grows with the span, so labels never share a position), labelled with its ops;
  grey arcs below the line join the output nodes to the cell output."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  topo = genotype.search_space.cells[cell_type]
  n_all = topo.num_inputs + topo.num_nodes
  concat = genotype.concat(cell_type)
  single_output = len(topo.concat) == 1
  xs = {node: 3.0 * node for node in range(n_all)}
  out_x = xs[n_all - 1] + 3.0
  used = {s for _, s, _ in genotype.cell(cell_type)} | {t for t, _, _ in genotype.cell(cell_type)}
  edge_labels, step, top = _cell_layout(genotype, cell_type)

  for (source, target), label in edge_labels.items():
    x0, x1 = xs[source], xs[target]
    height = step * (target - source)
    arc = patches.Arc(((x0 + x1) / 2, 0.0), x1 - x0, 2 * height, theta1=0, theta2=180,
                      color="tab:blue", lw=1.6, zorder=1)
    ax.add_patch(arc)
    ax.annotate("", xy=(x1, 0.35), xytext=(x1 + 0.02, 0.6),
                arrowprops=dict(arrowstyle="-|>", color="tab:blue", lw=1.2))
    ax.text((x0 + x1) / 2, height, label, ha="center", va="center", fontsize=8,
            zorder=3, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="tab:blue", lw=0.8))

  if not single_output:
    for node in concat:
      depth = 0.8 + 0.35 * (out_x - xs[node]) / 3.0
      ax.add_patch(patches.Arc(((xs[node] + out_x) / 2, 0.0), out_x - xs[node], 2 * depth,
                               theta1=180, theta2=360, color="0.55", lw=1.0, ls="--", zorder=1))

  for node in range(n_all):
    if node < topo.num_inputs:
      color = "palegreen"
    elif node in used or node in concat:
      color = "lightskyblue"
    else:
      color = "0.9"  # pruned node
    label = _node_label(genotype.space, node)
    ax.text(xs[node], 0.0, f"${label}$" if "{" in label else label, ha="center", va="center",
            fontsize=9, zorder=4, bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="black"))
  if single_output:
    out_label = "output = n3" if concat else "output = 0 (all none)"
    ax.text(xs[n_all - 1], -1.2, out_label, ha="center", va="center", fontsize=9)
  else:
    ax.text(out_x, 0.0, "concat" if concat else "empty", ha="center", va="center", fontsize=9,
            zorder=4, bbox=dict(boxstyle="round,pad=0.35", fc="khaki", ec="black"))
  ax.set_xlim(-1.5, out_x + 1.5)
  ax.set_ylim(-0.8 - 0.35 * (n_all + 1) - 0.5, top)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title(f"{cell_type} cell ({len(genotype.cell(cell_type))} ops, output "
               f"{list(concat)})", fontsize=10)


def plot(genotype: Genotype, path_prefix: str, title: str | None = None) -> tuple[str, str]:
  """Draws the cells of `genotype` and writes ``<path_prefix>.png`` and ``<path_prefix>.svg``.

  Uses matplotlib with the Agg backend (no display, no graphviz). Each cell is an arc diagram:
  green = cell inputs, blue = intermediate nodes, grey = pruned nodes; each blue arc is one edge
  labelled with all its ops (several ops on an edge are summed); dashed arcs feed the concat.

  Args:
    genotype: the genotype to draw.
    path_prefix: output path without extension; missing folders are created.
    title: figure title (default: the space name).

  Returns:
    The PNG and SVG paths.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  cell_types = genotype.cell_types
  # Figure size follows the drawing's extent in data units (equal aspect), 0.4 inch per unit.
  topo = genotype.search_space.cells["normal"]
  n_all = topo.num_inputs + topo.num_nodes
  width = 3.0 * n_all + 3.0
  heights = [_cell_layout(genotype, t)[2] + 0.35 * (n_all + 1) + 1.3 + 1.0 for t in cell_types]
  fig, axes = plt.subplots(len(cell_types), 1, figsize=(0.4 * width, 0.4 * sum(heights) + 0.5),
                           squeeze=False, gridspec_kw={"height_ratios": heights})
  for ax, cell_type in zip(axes[:, 0], cell_types):
    _draw_cell(ax, genotype, cell_type)
  fig.suptitle(title or f"{genotype.space} genotype", fontsize=12)
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


# ---------------------------------------------------------------------------------------------
# Named genotypes (reference_numbers.md; BayesNAS cells from CNN/pre_trained/<lambda>/OneShot.py)
# ---------------------------------------------------------------------------------------------


def _darts(normal, reduce) -> Genotype:
  return from_darts(DartsGenotype(normal, [2, 3, 4, 5], reduce, [2, 3, 4, 5]))


_K2, _K1, _N0 = 0, 1, 2  # c_{k-2}, c_{k-1}, intermediate node n0


def _bayesnas(normal: Mapping[int, Sequence[tuple[Sequence[str], int]]],
              reduce: Mapping[int, Sequence[tuple[Sequence[str], int]]]) -> Genotype:
  """Cells written as ``{node_index n: [((op, ...), source), ...]}``; node n has id ``2 + n``."""
  def triples(cell):
    return tuple((2 + n, source, op) for n, inputs in cell.items()
                 for ops, source in inputs for op in ops)
  return Genotype(space="bayesnas", normal=triples(normal), reduce=triples(reduce),
                  normal_concat=(2, 3, 4, 5), reduce_concat=(2, 3, 4, 5))


NAMED_GENOTYPES: dict[str, Genotype] = {
    "darts_v1": _darts(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)]),
    "darts_v2": _darts(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)]),
    "pc_darts": _darts(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]),
    "drnas": _darts(
        [("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("dil_conv_5x5", 3)],
        [("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2), ("sep_conv_5x5", 1),
         ("sep_conv_5x5", 1), ("dil_conv_5x5", 3), ("skip_connect", 4), ("sep_conv_5x5", 1)]),
    "gdas_v1": _darts(
        [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 3), ("skip_connect", 0), ("sep_conv_5x5", 4), ("sep_conv_3x3", 3)],
        [("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("sep_conv_5x5", 1),
         ("dil_conv_5x5", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)]),
    "bayesnas_0.01": _bayesnas(
        normal={0: [(("sep5",), _K1), (("sep5", "max", "avg", "ident"), _K2)],
                1: [(("max", "ident"), _K1)],
                2: [(("ident",), _K1), (("max",), _K2)],
                3: [(("avg",), _N0)]},
        reduce={0: [(("ident",), _K1), (("sep3", "avg", "max", "sep5"), _K2)],
                1: [(("max", "avg"), _K2)],
                2: [(("sep3", "avg"), _K2)],
                3: [(("sep5",), _N0)]}),
    # lambda 0.007 normal n1: the released code also declares max@in1 (k-2) but never uses it in
    # the forward pass, so it is not part of the cell.
    "bayesnas_0.007": _bayesnas(
        normal={0: [(("sep3", "ident"), _K2)],
                1: [(("sep3", "ident"), _K1)],
                2: [(("ident",), _K1), (("sep3",), _K2)],
                3: [(("sep5", "max", "avg"), _K2), (("ident",), _N0)]},
        reduce={0: [(("sep5", "avg"), _K1), (("avg", "max", "ident", "sep5"), _K2)],
                1: [(("avg",), _K2), (("ident",), _N0)],
                2: [(("avg",), _K2), (("sep5", "ident"), _N0)],
                3: [(("avg", "max"), _N0)]}),
    "bayesnas_0.005": _bayesnas(
        normal={0: [(("max", "avg", "ident"), _K2)],
                1: [(("ident",), _K1), (("sep5",), _K2)],
                2: [(("avg",), _K1), (("ident", "max"), _K2)],
                3: [(("sep5",), _K2), (("max",), _N0)]},
        reduce={0: [(("sep3", "sep5", "max"), _K1), (("avg", "max"), _K2)],
                1: [(("max", "avg", "ident"), _N0)],
                2: [(("ident", "max"), _K2)],
                3: [(("sep3", "max"), _K2), (("max",), _N0)]}),
    # NAS-Bench-201 reference cells (values in the NASLib validation table, see bnas_jax.nb201).
    "nb201_all_skip": from_nb201_string(
        "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|"
        "skip_connect~2|"),
    "nb201_all_conv3": from_nb201_string(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|"
        "nor_conv_3x3~2|"),
    # Best cifar10 validation accuracy in the NASLib table (NASLib tuple (2, 3, 0, 2, 3, 2)).
    "nb201_best_val": from_nb201_string(nb201.naslib_to_arch((2, 3, 0, 2, 3, 2))),
}


def get_genotype(name: str) -> Genotype:
  """Returns the registered genotype `name`.

  Raises:
    ValueError: naming the unknown genotype and listing the registered names.
  """
  try:
    return NAMED_GENOTYPES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown genotype {name!r}; registered names: "
                     f"{sorted(NAMED_GENOTYPES)}") from None


def load_genotype(name_or_path: str) -> Genotype:
  """A registered genotype name, or the path of a genotype JSON file (see `Genotype.save`).

  Raises:
    ValueError: if `name_or_path` is neither a registered name nor an existing file.
  """
  if name_or_path in NAMED_GENOTYPES:
    return NAMED_GENOTYPES[name_or_path]
  if os.path.isfile(name_or_path):
    return Genotype.load(name_or_path)
  raise ValueError(f"{name_or_path!r} is neither a registered genotype "
                   f"({sorted(NAMED_GENOTYPES)}) nor an existing genotype JSON file")
