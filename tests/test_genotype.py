"""Tests of bnas_jax.genotype: validation, serialisation, conversions, derivation, pictures."""

import json
import os

import numpy as np
import pytest

from bnas_jax import genotype as G
from bnas_jax import nb201
from bnas_jax.search_space import spaces

# ---------------------------------------------------------------------------------------------
# Independent transcriptions of the published cells (reference_numbers.md), in another notation.
# ---------------------------------------------------------------------------------------------

# DARTS format: "op,input" tokens, two per node 2..5.
DARTS_TEXT = {
    "darts_v1": ("sep_conv_3x3,1 sep_conv_3x3,0 skip_connect,0 sep_conv_3x3,1 skip_connect,0 "
                 "sep_conv_3x3,1 sep_conv_3x3,0 skip_connect,2",
                 "max_pool_3x3,0 max_pool_3x3,1 skip_connect,2 max_pool_3x3,0 max_pool_3x3,0 "
                 "skip_connect,2 skip_connect,2 avg_pool_3x3,0"),
    "darts_v2": ("sep_conv_3x3,0 sep_conv_3x3,1 sep_conv_3x3,0 sep_conv_3x3,1 sep_conv_3x3,1 "
                 "skip_connect,0 skip_connect,0 dil_conv_3x3,2",
                 "max_pool_3x3,0 max_pool_3x3,1 skip_connect,2 max_pool_3x3,1 max_pool_3x3,0 "
                 "skip_connect,2 skip_connect,2 max_pool_3x3,1"),
    "pc_darts": ("sep_conv_3x3,1 skip_connect,0 sep_conv_3x3,0 dil_conv_3x3,1 sep_conv_5x5,0 "
                 "sep_conv_3x3,1 avg_pool_3x3,0 dil_conv_3x3,1",
                 "sep_conv_5x5,1 max_pool_3x3,0 sep_conv_5x5,1 sep_conv_5x5,2 sep_conv_3x3,0 "
                 "sep_conv_3x3,3 sep_conv_3x3,1 sep_conv_3x3,2"),
    "drnas": ("sep_conv_3x3,0 sep_conv_5x5,1 sep_conv_3x3,1 sep_conv_3x3,2 skip_connect,0 "
              "sep_conv_3x3,1 sep_conv_3x3,2 dil_conv_5x5,3",
              "max_pool_3x3,0 sep_conv_5x5,1 dil_conv_5x5,2 sep_conv_5x5,1 sep_conv_5x5,1 "
              "dil_conv_5x5,3 skip_connect,4 sep_conv_5x5,1"),
    "gdas_v1": ("skip_connect,0 skip_connect,1 skip_connect,0 sep_conv_5x5,2 sep_conv_3x3,3 "
                "skip_connect,0 sep_conv_5x5,4 sep_conv_3x3,3",
                "sep_conv_5x5,0 sep_conv_3x3,1 sep_conv_5x5,2 sep_conv_5x5,1 dil_conv_5x5,2 "
                "sep_conv_3x3,1 sep_conv_5x5,0 sep_conv_5x5,1"),
}

# BayesNAS cells by the original code's edge names (spec 2.2): inA_n = input A -> node n, with
# in0 = c_{k-1} (node 1), in1 = c_{k-2} (node 0); sel_0_n = node n0 (id 2) -> node n.
BAYESNAS_TEXT = {
    "bayesnas_0.01": (
        {"in0_0": "sep5", "in1_0": "sep5 max avg ident", "in0_1": "max ident", "in0_2": "ident",
         "in1_2": "max", "sel_0_3": "avg"},
        {"in0_0": "ident", "in1_0": "sep3 avg max sep5", "in1_1": "max avg", "in1_2": "sep3 avg",
         "sel_0_3": "sep5"}),
    "bayesnas_0.007": (
        {"in1_0": "sep3 ident", "in0_1": "sep3 ident", "in0_2": "ident", "in1_2": "sep3",
         "in1_3": "sep5 max avg", "sel_0_3": "ident"},
        {"in0_0": "sep5 avg", "in1_0": "avg max ident sep5", "in1_1": "avg", "sel_0_1": "ident",
         "in1_2": "avg", "sel_0_2": "sep5 ident", "sel_0_3": "avg max"}),
    "bayesnas_0.005": (
        {"in1_0": "max avg ident", "in0_1": "ident", "in1_1": "sep5", "in0_2": "avg",
         "in1_2": "ident max", "in1_3": "sep5", "sel_0_3": "max"},
        {"in0_0": "sep3 sep5 max", "in1_0": "avg max", "sel_0_1": "max avg ident",
         "in1_2": "ident max", "in1_3": "sep3 max", "sel_0_3": "max"}),
}


def _edge_by_name(name):
  """(source, target) of a BayesNAS code edge name."""
  head, a, n = name.split("_") if name.startswith("sel") else ("in", name[2], name[4])
  source = 2 if head == "sel" else (1 if a == "0" else 0)
  return source, 2 + int(n)


def _bayesnas_triples(cell):
  out = set()
  for name, ops in cell.items():
    source, target = _edge_by_name(name)
    out |= {(target, source, op) for op in ops.split()}
  return out


# ---------------------------------------------------------------------------------------------
# Independent connectivity reference: reachability (not the module's fixed-point iteration).
# ---------------------------------------------------------------------------------------------


def _reference_cell(space, cell_type, triples):
  """Keeps ops whose source is reachable from the inputs (and, for nb201, whose target reaches
  node 3); returns (triples, concat)."""
  topo = space.cells[cell_type]
  triples = set(triples)
  forward = set(range(topo.num_inputs))
  changed = True
  while changed:
    changed = False
    for t, s, _ in triples:
      if s in forward and t not in forward:
        forward.add(t)
        changed = True
  kept = {tr for tr in triples if tr[1] in forward}
  if space.name == "nb201":
    backward = {3}
    changed = True
    while changed:
      changed = False
      for t, s, _ in kept:
        if t in backward and s not in backward:
          backward.add(s)
          changed = True
    kept = {tr for tr in kept if tr[0] in backward}
  targets = {t for t, _, _ in kept}
  concat = tuple(n for n in topo.concat if n in targets)
  return kept, concat


def _assert_connected(genotype):
  space = genotype.search_space
  for cell_type in space.cells:
    triples = set(genotype.cell(cell_type))
    ref, concat = _reference_cell(space, cell_type, triples)
    assert ref == triples, f"{cell_type}: disconnected ops {triples - ref}"
    assert genotype.concat(cell_type) == concat


def _alive_from(genotype):
  """The alive mask that keeps exactly the ops of `genotype` (origins alive where an op is)."""
  space = genotype.search_space
  alive = {t: np.zeros(space.group_shape(t), bool) for t in space.cells}
  for cell_type, topo in space.cells.items():
    index = {(e.source, e.target): i for i, e in enumerate(topo.edges)}
    for t, s, op in genotype.cell(cell_type):
      e = index[(s, t)]
      alive[cell_type][e, 0] = True
      alive[cell_type][e, 1 + space.ops.index(op)] = True
  return alive


# ---------------------------------------------------------------------------------------------
# Named genotypes, serialisation and conversions
# ---------------------------------------------------------------------------------------------


def test_named_genotypes_match_published_cells():
  for name, (normal, reduce) in DARTS_TEXT.items():
    g = G.get_genotype(name)
    for cell_type, text in (("normal", normal), ("reduce", reduce)):
      expected = set()
      for k, token in enumerate(text.split()):
        op, src = token.split(",")
        expected.add((2 + k // 2, int(src), op))
      assert set(g.cell(cell_type)) == expected, (name, cell_type)
      assert g.concat(cell_type) == (2, 3, 4, 5)
  for name, (normal, reduce) in BAYESNAS_TEXT.items():
    g = G.get_genotype(name)
    assert set(g.normal) == _bayesnas_triples(normal), name
    assert set(g.reduce) == _bayesnas_triples(reduce), name
    assert not any(op.startswith("dil") for _, _, op in g.normal + g.reduce)  # spec 8.3
  # lambda 0.007: the declared-but-unused max@in1 of node n1 is not part of the cell.
  assert (3, 0, "max") not in G.get_genotype("bayesnas_0.007").normal
  counts = {n: (G.get_genotype(n).num_ops("normal"), G.get_genotype(n).num_ops("reduce"))
            for n in BAYESNAS_TEXT}
  assert counts == {"bayesnas_0.01": (10, 10), "bayesnas_0.007": (10, 13),
                    "bayesnas_0.005": (10, 13)}


@pytest.mark.parametrize("name", sorted(G.NAMED_GENOTYPES))
def test_json_round_trip_and_connected(name, tmp_path):
  g = G.get_genotype(name)
  assert G.Genotype.from_json(g.to_json()) == g
  assert json.loads(g.to_json())["format_version"] == G.FORMAT_VERSION
  path = tmp_path / "sub" / "g.json"
  g.save(str(path))
  assert sorted(os.listdir(path.parent)) == ["g.json"]  # no temp file left
  assert G.Genotype.load(str(path)) == g
  assert G.load_genotype(str(path)) == g
  assert G.load_genotype(name) is g
  _assert_connected(g)
  g.check_buildable()
  # derive() on the genotype's own alive mask reproduces it
  assert G.derive(g.space, _alive_from(g)) == g


@pytest.mark.parametrize("name", sorted(n for n, g in G.NAMED_GENOTYPES.items()
                                        if g.space == "darts"))
def test_darts_conversion_identity(name):
  g = G.get_genotype(name)
  d = G.to_darts(g)
  assert len(d.normal) == len(d.reduce) == 8
  assert list(d.normal_concat) == [2, 3, 4, 5]
  assert G.from_darts(d) == g
  # The original namedtuple form with range() concat (as in DARTS' genotypes.py) is accepted.
  normal, reduce = DARTS_TEXT[name]
  pairs = lambda text: [(t.split(",")[0], int(t.split(",")[1])) for t in text.split()]
  orig = G.DartsGenotype(pairs(normal), range(2, 6), pairs(reduce), range(2, 6))
  assert G.from_darts(orig) == g
  # same pairs per node as the published list (order within a node is not significant)
  for cell_type in ("normal", "reduce"):
    ours, theirs = getattr(d, cell_type), getattr(orig, cell_type)
    for k in range(0, 8, 2):
      assert sorted(ours[k:k + 2]) == sorted(theirs[k:k + 2])


def test_nb201_conversion_identity():
  for name, g in G.NAMED_GENOTYPES.items():
    if g.space == "nb201":
      assert G.from_nb201_string(G.to_nb201_string(g)) == g
  # every one of the 15,625 cells
  for s in nb201.all_arch_strings():
    g = G.from_nb201_string(s)
    assert G.to_nb201_string(g) == s
  g = G.from_nb201_string("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")
  assert g.normal == () and g.normal_concat == () and g.reduce == ()
  g.check_buildable()  # the all-none cell is a valid nb201 architecture
  assert G.get_genotype("nb201_best_val").normal == (
      (1, 0, "nor_conv_3x3"), (2, 0, "nor_conv_1x1"), (2, 1, "nor_conv_3x3"),
      (3, 0, "skip_connect"), (3, 1, "nor_conv_1x1"), (3, 2, "nor_conv_3x3"))


def test_conversion_errors():
  with pytest.raises(ValueError, match="'darts' genotype"):
    G.to_darts(G.get_genotype("bayesnas_0.01"))
  one_input = G.Genotype("darts", [(2, 0, "skip_connect")], [], [2], [])
  with pytest.raises(ValueError, match="exactly 2 per node"):
    G.to_darts(one_input)
  with pytest.raises(ValueError, match="'nb201' genotype"):
    G.to_nb201_string(G.get_genotype("darts_v2"))
  two_ops = G.Genotype("nb201", [(3, 0, "skip_connect"), (3, 0, "nor_conv_1x1")], [], [3], [])
  with pytest.raises(ValueError, match="exactly one op per edge"):
    G.to_nb201_string(two_ops)


def test_registry_errors(tmp_path):
  with pytest.raises(ValueError, match="darts_v2"):
    G.get_genotype("darts_v3")
  with pytest.raises(ValueError, match="bayesnas_0.01"):
    G.load_genotype(str(tmp_path / "missing.json"))
  bad = tmp_path / "old.json"
  d = G.get_genotype("darts_v1").to_dict()
  d["format_version"] = 99
  bad.write_text(json.dumps(d))
  with pytest.raises(ValueError, match="format_version"):
    G.Genotype.load(str(bad))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(space="nasnet"), "unknown space 'nasnet'"),
    (dict(normal=[(2, 0, "conv7")]), r"unknown op 'conv7' in \(2, 0, 'conv7'\)"),
    (dict(normal=[(2, 0, "sep_conv_3x3")]), r"unknown op 'sep_conv_3x3'"),  # darts op name
    (dict(normal=[(6, 0, "sep3")]), r"target 6 of \(6, 0, 'sep3'\)"),
    (dict(normal=[(1, 0, "sep3")]), r"target 1 of \(1, 0, 'sep3'\)"),
    (dict(normal=[(3, -1, "sep3")]), r"source -1 of \(3, -1, 'sep3'\)"),
    (dict(normal=[(3, 3, "sep3")]), r"source 3 >= target 3 in \(3, 3, 'sep3'\)"),
    (dict(normal=[(5, 1, "sep3")]), r"edge 1->5 of \(5, 1, 'sep3'\) is not in"),
    (dict(normal=[(2, 0, "sep3"), (2, 0, "sep3")]), "duplicated triple"),
    (dict(normal=[(2, 0, "sep3", 1)]), "not a \\(target, source, op\\) triple"),
    (dict(normal=[(2.0, 0, "sep3")]), "must be an int"),
    (dict(normal_concat=(2, 3)), "node 3 has no input edge"),
    (dict(normal_concat=(1,)), "node 1 cannot be an output node"),
])
def test_validation_errors(kwargs, pattern):
  fields = dict(space="bayesnas", normal=[(2, 0, "sep3")], reduce=[(2, 0, "max")],
                normal_concat=(2,), reduce_concat=(2,))
  fields.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    G.Genotype(**fields)


def test_validation_normalises_and_nb201_rules():
  g = G.Genotype("bayesnas", [[5, 2, "avg"], (2, np.int64(0), "sep3")], [], [5, 2], [])
  assert g.normal == ((2, 0, "sep3"), (5, 2, "avg")) and g.normal_concat == (2, 5)
  assert isinstance(g.normal[0][1], int)
  with pytest.raises(ValueError, match="no 'reduce' cell"):
    G.Genotype("nb201", [(3, 0, "skip_connect")], [(3, 0, "skip_connect")], [3], [])
  with pytest.raises(ValueError, match="node 2 cannot be an output node"):
    G.Genotype("nb201", [(2, 0, "skip_connect")], [], [2], [])


# ---------------------------------------------------------------------------------------------
# Derivation
# ---------------------------------------------------------------------------------------------


def _full(space):
  return spaces.full_mask(space)


def test_derive_all_alive_bayesnas():
  space = spaces.get_space("bayesnas")
  g = G.derive(space, _full(space))
  for cell_type, topo in space.cells.items():
    assert len(g.cell(cell_type)) == len(topo.edges) * len(space.ops)
    assert g.concat(cell_type) == (2, 3, 4, 5)
  _assert_connected(g)


def test_derive_dead_origin_with_live_ops():
  space = spaces.get_space("bayesnas")
  alive = _full(space)
  alive["normal"][0, 0] = False  # in0_0 (1 -> 2): origin dead, all ops alive
  g = G.derive(space, alive)
  assert not any((t, s) == (2, 1) for t, s, _ in g.normal)
  assert (2, 0, "sep3") in g.normal
  _assert_connected(g)


def test_derive_dead_node_cascades():
  space = spaces.get_space("bayesnas")
  alive = _full(space)
  # normal: both inputs of n0 (node 2) dead -> its outgoing sel_0_3 (2 -> 5) must go even
  # though its switches are alive; node 5 keeps in1_3.
  alive["normal"][0, 0] = False  # in0_0
  alive["normal"][1, 1:] = False  # in1_0: origin alive, every op dead
  # reduce: node 2 dead and in1_k dead -> nodes 3, 4, 5 only had node 2 left -> empty cell parts
  alive["reduce"][0, 0] = alive["reduce"][1, 0] = False  # in0_0, in1_0
  alive["reduce"][2, 0] = False  # in1_1 -> node 3 only fed by node 2 (dead)
  g = G.derive(space, alive)
  assert not any(s == 2 for _, s, _ in g.normal)
  assert not any(t == 2 for t, _, _ in g.normal)
  assert g.normal_concat == (3, 4, 5)
  assert not any(t in (2, 3) or s == 2 for t, s, _ in g.reduce)
  assert g.reduce_concat == (4, 5)
  _assert_connected(g)
  g.check_buildable()


def test_derive_all_dead_cell():
  space = spaces.get_space("darts")
  alive = _full(space)
  alive["reduce"][:] = False
  g = G.derive(space, alive)
  assert g.reduce == () and g.reduce_concat == () and g.is_empty("reduce")
  assert len(g.normal) == 14 * 7
  with pytest.raises(ValueError, match="reduce cell .* is empty"):
    g.check_buildable()
  # with scores: the best-scored op per node, taken among edges from inputs / kept nodes
  rng = np.random.default_rng(0)
  scores = {t: rng.normal(size=space.group_shape(t)) for t in space.cells}
  g = G.derive(space, alive, scores)
  g.check_buildable()
  _assert_connected(g)
  topo = space.cells["reduce"]
  assert g.reduce_concat == (2, 3, 4, 5)
  for node in topo.node_ids:
    into = [tr for tr in g.reduce if tr[0] == node]
    assert len(into) == 1
    best = max(((scores["reduce"][e, 1 + i], (node, topo.edges[e].source, op))
                for e in topo.edges_into(node) for i, op in enumerate(space.ops)))
    assert into[0] == best[1]


def test_derive_nb201_unreachable_output():
  space = spaces.get_space("nb201")
  # edges in order 0->1, 0->2, 1->2, 0->3, 1->3, 2->3
  alive = {"normal": np.zeros((6, 5), bool)}
  alive["normal"][[0, 2, 3], 0] = True  # 0->1, 1->2, 0->3 alive; 1->3, 2->3 dead
  alive["normal"][[0, 2, 3], 2] = True  # nor_conv_1x1
  alive["normal"][4, 1:] = True  # 1->3: ops alive but origin dead
  g = G.derive(space, alive)
  assert g.normal == ((3, 0, "nor_conv_1x1"),) and g.normal_concat == (3,)
  _assert_connected(g)
  # nothing reaches node 3 -> the all-none cell, valid for nb201
  alive["normal"][3, 0] = False
  g = G.derive(space, alive)
  assert g.normal == () and g.normal_concat == ()
  assert G.to_nb201_string(g) == "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
  g.check_buildable()


@pytest.mark.parametrize("space_name", ["bayesnas", "darts", "nb201"])
def test_derive_random_patterns_match_reference(space_name):
  space = spaces.get_space(space_name)
  rng = np.random.default_rng(1)
  for trial in range(150):
    p = rng.uniform(0.1, 0.9)
    alive = {t: rng.uniform(size=space.group_shape(t)) < p for t in space.cells}
    scores = {t: rng.normal(size=space.group_shape(t)) for t in space.cells}
    scores_given = scores if trial % 2 else None
    g = G.derive(space, alive, scores_given)
    for cell_type, topo in space.cells.items():
      a = alive[cell_type]
      raw = {(e.target, e.source, op) for i, e in enumerate(topo.edges)
             for k, op in enumerate(space.ops) if a[i, 0] and a[i, 1 + k]}
      ref, concat = _reference_cell(space, cell_type, raw)
      if concat or scores_given is None:
        assert set(g.cell(cell_type)) == ref, (trial, cell_type)
        assert g.concat(cell_type) == concat
      else:  # empty cell with scores: fallback, one op per node before connectivity repair
        assert g.concat(cell_type)
        assert len({t for t, _, _ in g.cell(cell_type)}) == len(g.cell(cell_type))
    _assert_connected(g)
    if scores_given is not None:
      g.check_buildable()


def test_all_pruned_cell_is_ranked_by_the_gammas_before_pruning():
  """An update that prunes every op of a cell: the fallback ranks the ops by the state's `score`
  (gammas before pruning), and the gammas after pruning (all 0) are refused, not used to return
  the first op of every node."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bnas_jax import bayes  # pylint: disable=g-import-not-at-top
  space = spaces.get_space("bayesnas")
  rng = np.random.default_rng(5)
  shapes = space.switch_shapes({"normal": 2, "reduce": 1})
  s = {t: jnp.asarray(rng.uniform(0.5, 1.5, sh), jnp.float32) for t, sh in shapes.items()}
  h = {t: jnp.ones(sh, jnp.float32) for t, sh in shapes.items()}
  st = bayes.update(bayes.init(s), s, h, lambda_origin=1.0, lambda_op=1.0, prune_threshold=1e3,
                    prune_mode="absolute", cells=space.cells)
  assert not any(np.asarray(a).any() for a in st.alive.values())  # everything pruned
  alive = {t: np.asarray(a) for t, a in st.alive.items()}
  score = {t: np.asarray(v) for t, v in st.score.items()}
  g = G.derive(space, alive, score)
  for cell_type, topo in space.cells.items():
    for node, source, op in g.cell(cell_type):
      # The kept op is the best-scored one among the edges into its node from live sources.
      e = next(i for i, ed in enumerate(topo.edges) if ed.target == node and ed.source == source)
      best = max(score[cell_type][i, 1 + k] for i in topo.edges_into(node)
                 for k in range(len(space.ops))
                 if topo.edges[i].source < topo.num_inputs or any(
                     n == topo.edges[i].source for n, _, _ in g.cell(cell_type)))
      assert score[cell_type][e, 1 + space.ops.index(op)] == best
  g.check_buildable()
  zeros = {t: np.asarray(bayes.group_gamma(st)[t]) for t in st.gamma}
  assert all((z == 0).all() for z in zeros.values())
  with pytest.raises(ValueError, match="do not rank its ops"):
    G.derive(space, alive, zeros)


def test_derive_bad_input():
  space = spaces.get_space("bayesnas")
  with pytest.raises(ValueError, match="lacks cell type 'reduce'"):
    G.derive(space, {"normal": np.ones((8, 8), bool)})
  with pytest.raises(ValueError, match=r"shape \(8, 7\)"):
    G.derive(space, {"normal": np.ones((8, 7), bool), "reduce": np.ones((8, 8), bool)})


def test_derive_darts_top2():
  space = spaces.get_space("darts")
  rng = np.random.default_rng(2)
  for trial in range(20):
    scores = {t: rng.normal(size=space.group_shape(t)) for t in space.cells}
    g = G.derive_darts(space, scores)
    d = G.to_darts(g)  # raises unless exactly 2 inputs per node
    assert len(d.normal) == len(d.reduce) == 8
    for cell_type, topo in space.cells.items():
      s = scores[cell_type][:, 1:]
      for node in topo.node_ids:
        into = topo.edges_into(node)
        top2 = sorted(into, key=lambda e: s[e].max())[-2:]
        expected = {(node, topo.edges[e].source, space.ops[int(np.argmax(s[e]))]) for e in top2}
        assert {tr for tr in g.cell(cell_type) if tr[0] == node} == expected
    _assert_connected(g)
  # with alive: pruned ops are never chosen; a node with < 2 alive edges is still filled to 2
  alive = _full(space)
  alive["normal"][:, 4] = False  # sep_conv_3x3 dead everywhere
  scores["normal"][:, 4] = 100.0  # ... although it scores best
  into5 = space.cells["normal"].edges_into(5)
  alive["normal"][list(into5[1:]), 0] = False  # node 5: only edge 0->5 alive
  g = G.derive_darts(space, scores, alive)
  assert not any(op == "sep_conv_3x3" for t, _, op in g.normal if t != 5)
  node5 = [tr for tr in g.normal if tr[0] == 5]
  assert len(node5) == 2
  from_0 = [tr for tr in node5 if tr[1] == 0]
  assert len(from_0) == 1 and from_0[0][2] != "sep_conv_3x3"  # alive edge: alive op only
  filled = [tr for tr in node5 if tr[1] != 0][0]  # filler ignores alive: best raw op
  assert filled[2] == "sep_conv_3x3"
  assert len(G.to_darts(g).normal) == 8


def test_derive_nb201_string():
  space = spaces.get_space("nb201")
  scores = {"normal": np.tile(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), (6, 1))}  # avg_pool best
  alive = {"normal": np.ones((6, 5), bool)}
  alive["normal"][0, 4] = False  # 0->1: avg dead -> nor_conv_3x3
  alive["normal"][1, 0] = False  # 0->2: origin dead -> none
  alive["normal"][2, 1:] = False  # 1->2: no op alive -> none
  alive["normal"][5, 0] = False  # 2->3 origin dead
  s = G.derive_nb201(space, scores, alive)
  assert s == ("|nor_conv_3x3~0|+|none~0|none~1|+|avg_pool_3x3~0|avg_pool_3x3~1|none~2|")
  assert nb201.parse_arch_string(s)  # well formed
  with pytest.raises(ValueError, match="nb201 space"):
    G.derive_nb201("darts", scores, alive)


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------


def test_plot_writes_png_and_svg(tmp_path):
  space = spaces.get_space("darts")
  alive = _full(space)
  alive["reduce"][:] = False
  cases = {"bayesnas": G.get_genotype("bayesnas_0.007"),
           "nb201": G.get_genotype("nb201_best_val"),
           "empty": G.derive(space, alive)}
  for name, g in cases.items():
    png, svg = G.plot(g, str(tmp_path / "pics" / name))
    assert png.endswith(".png") and svg.endswith(".svg")
    with open(png, "rb") as f:
      head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
    with open(svg) as f:
      text = f.read()
    assert "<svg" in text and len(text) > 5000


def _greedy_reference(space, cell_type, survivors, scores, k):
  """Plain-Python restatement of the max_ops rule: best-scored op whose source is connected."""
  topo = space.cells[cell_type]
  ranked = sorted(survivors, key=lambda tr: (-scores[tr], tr[3], tr[4]))
  kept, live = [], set(range(topo.num_inputs))
  while len(kept) < k:
    for tr in ranked:
      if tr not in kept and tr[1] in live:
        kept.append(tr)
        live.add(tr[0])
        break
    else:
      break
  return {tr[:3] for tr in kept}


@pytest.mark.parametrize("space_name", ["bayesnas", "darts"])
@pytest.mark.parametrize("k", [3, 13])
def test_derive_max_ops_keeps_the_best_connected_survivors(space_name, k):
  space = spaces.get_space(space_name)
  rng = np.random.default_rng(3)
  for trial in range(10):
    alive = {t: rng.random(space.group_shape(t)) < 0.8 for t in space.cells}
    scores = {t: rng.random(space.group_shape(t)) for t in space.cells}
    g = G.derive(space, alive, scores, max_ops=k)
    uncapped = G.derive(space, alive, scores)
    for t, topo in space.cells.items():
      a, sc = alive[t], scores[t]
      survivors = [(topo.edges[e].target, topo.edges[e].source, space.ops[i], e, i)
                   for e in range(len(topo.edges)) for i in range(len(space.ops))
                   if a[e, 0] and a[e, 1 + i]]
      score = {tr: sc[tr[3], 1 + tr[4]] for tr in survivors}
      got = set(g.cell(t))
      assert got == _greedy_reference(space, t, survivors, score, k), (trial, t)
      # As many ops as the cap allows: the connected survivors are all reachable greedily.
      assert len(got) == min(k, len(uncapped.cell(t))), (trial, t)
      assert got <= set(uncapped.cell(t))
      assert set(G.prune_disconnected(space, t, got)[0]) == got  # nothing hangs off a dead node
    _assert_connected(g)


def test_derive_max_ops_no_effect_below_cap_and_errors():
  space = spaces.get_space("bayesnas")
  alive = _full(space)
  scores = {t: np.ones(space.group_shape(t)) for t in space.cells}
  assert G.derive(space, alive, scores, max_ops=10_000) == G.derive(space, alive)
  with pytest.raises(ValueError, match="max_ops"):
    G.derive(space, alive, scores, max_ops=-1)
  with pytest.raises(ValueError, match="pass scores"):
    G.derive(space, alive, max_ops=13)


def test_load_names_the_bad_file(tmp_path):
  path = tmp_path / "g.json"
  path.write_text('{"space": "darts", "normal": []}')
  with pytest.raises(ValueError, match="g.json is not a valid genotype JSON file"):
    G.Genotype.load(str(path))


def test_from_json_rejects_a_non_object_and_save_uses_the_usual_mode(tmp_path):
  with pytest.raises(ValueError, match="must be an object"):
    G.Genotype.from_json("[1, 2]")
  path = tmp_path / "g.json"
  G.get_genotype("darts_v2").save(str(path))
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_register_adds_a_name_and_refuses_a_clash():
  g = G.from_nb201_string("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|"
                          "nor_conv_3x3~1|avg_pool_3x3~2|")
  name = "test_register_nb201_cell"
  try:
    G.register(name, g)
    assert G.get_genotype(name) == g and G.load_genotype(name) == g
    G.register(name, g)  # the same genotype again: allowed
    with pytest.raises(ValueError, match="already registered"):
      G.register(name, G.get_genotype("nb201_all_skip"))
  finally:
    G.NAMED_GENOTYPES.pop(name, None)


def test_plot_cli_draws_names_json_files_and_nb201_strings(tmp_path, capsys):
  from bnas_jax.genotype import __main__ as cli  # pylint: disable=import-outside-toplevel
  arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_1x1~0|nor_conv_3x3~1|skip_connect~2|"
  (tmp_path / "arch.txt").write_text(arch + "\n")
  G.get_genotype("darts_v2").save(str(tmp_path / "g.json"))
  assert cli.resolve(arch) == G.from_nb201_string(arch)
  assert cli.resolve(str(tmp_path / "arch.txt")) == G.from_nb201_string(arch)
  assert cli.resolve(str(tmp_path / "g.json")) == G.get_genotype("darts_v2")
  assert cli.main(["bayesnas_0.01", "--out", str(tmp_path / "pic")]) == 0
  assert (tmp_path / "pic.png").stat().st_size > 0 and (tmp_path / "pic.svg").stat().st_size > 0
  from bnas_jax.search_space import tree as tree_lib  # pylint: disable=import-outside-toplevel
  assert cli.resolve("tree_cell_a") == tree_lib.TREE_CELL_A
  tree_lib.TREE_CELL_B.save(str(tmp_path / "tree.json"))
  assert cli.resolve(str(tmp_path / "tree.json")) == tree_lib.TREE_CELL_B
  assert cli.main(["no_such_cell", "--out", str(tmp_path / "x")]) == 2
  assert "not a registered genotype" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()
