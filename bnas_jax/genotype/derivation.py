"""Deriving a genotype from the HARD prior's alive mask and scores (spec 3.1 dependency motif, 5).

`derive` keeps every op whose own switch and whose edge's origin switch are alive and then repairs
connectivity (`prune_disconnected`); `derive_darts` is DARTS' top-2 export; `derive_nb201` picks one
op per edge and returns a NAS-Bench-201 arch string.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Union

import numpy as np

from bnas_jax import nb201
from bnas_jax.genotype.cell import Genotype, Triple, _int, _space
from bnas_jax.search_space import spaces
from bnas_jax.search_space import tree as tree_lib


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
  if tree_lib.is_tree_space(space):  # the proxyless search: a TreeCell (search_space/tree.py)
    return tree_lib.derive(space, alive, scores, max_ops=_int(max_ops, "max_ops"))
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
