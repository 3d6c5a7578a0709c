"""The proxyless search space: PyramidNet + tree cells, the tree data type, the tree supernet.

Oracles: the parameter counts of proxyless spec 1.6 and 3 (each matching the published rounded
value), the spec's width list and per-cell formula, spec 3.2's forward formulas of TreeCell-A
written out by hand, `bayes.connected_edges` (a matrix fixed point) for the recursive derivation,
and zero gradients through a dead subtree. Counts use `jax.eval_shape` (nothing is allocated).
"""

from __future__ import annotations

import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import bayes
from bnas_jax import genotype as genotype_lib
from bnas_jax.models import pyramidnet as pn
from bnas_jax.models import supernet as supernet_lib
from bnas_jax.models import tree_supernet
from bnas_jax.search_space import spaces
from bnas_jax.search_space import tree

import helpers

# ---- the backbone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,alpha,groups,expected", [
    (tree.TREE_CELL_A, 84, 2, 5_724_330),
    (tree.TREE_CELL_A, 150, 2, 14_273_454),
    (tree.TREE_CELL_B, 84, 2, 5_588_850),
    (tree.PLAIN_CELL, 84, 1, 3_757_494),  # PyramidNet-164 (add), alpha 84, bottleneck: 3.8 M
    (tree.PLAIN_CELL, 84, 2, 2_740_368),
])
def test_parameter_counts_match_the_spec_oracles(cell, alpha, groups, expected):
  assert pn.count_params(pn.PyramidNet(cell, 18, alpha, groups)) == expected


def test_widths_match_the_spec_reference_list():
  want = [int(w) for w in """18 18 20 22 24 24 26 28 30 32 32 34 36 38 38 40 42 44 46 46 48 50 52
      52 54 56 58 60 60 62 64 66 66 68 70 72 74 74 76 78 80 80 82 84 86 88 88 90 92 94 94 96 98
      100""".split()]
  assert list(pn.pyramid_widths(18, 84, 2)) == want
  assert sum(pn.pyramid_widths(18, 84, 2)) == 3150 and sum(pn.pyramid_widths(18, 150, 2)) == 4962
  assert pn.block_strides(2) == (1, 1, 2, 1, 2, 1)
  with pytest.raises(ValueError, match="num_blocks"):
    pn.pyramid_widths(0, 84)


@pytest.mark.parametrize("c", [18, 40, 100])
def test_tree_cell_a_parameters_follow_the_closed_form(c):
  # Spec 3.3: 16.25 C^2 + 145.5 C for G = 2 (C = 40: 31,820).
  model = pn.TreeCellNet(tree.TREE_CELL_A, c, 1, 2)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, c)), train=False),
                          jax.random.key(0))["params"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes)) == 16.25 * c * c + 145.5 * c


def _op(params, stats, name, op, c_out, x, stride=1, groups=1):
  mod = pn.EdgeOp(op, c_out, stride, groups, "shift")
  v = {"params": params.get(name, {}), "batch_stats": stats.get(name, {})}
  return mod.apply(v, x, train=False)


def test_tree_cell_a_forward_equals_the_spec_formulas():
  """Spec 3.2 written out with each edge applied on its own parameters (eval mode)."""
  c, key = 8, jax.random.key(1)
  model = pn.TreeCellNet(tree.TREE_CELL_A, c, 2, 2)
  x = jax.random.normal(key, (2, 8, 8, c))
  v = helpers.jit_init(model, jax.random.key(2), x, train=False)
  # Non-trivial running statistics, so that eval-mode batch norms are not the identity.
  v = {"params": v["params"], "batch_stats": jax.tree.map(
      lambda a: a + 0.3 * jax.random.uniform(key, a.shape), v["batch_stats"])}

  def written_out(p, s, x):  # compiled: eagerly, each of its ops would be compiled alone
    op = lambda name, o, z, **kw: _op(p, s, f"{name}_{o}", o, z.shape[-1], z, **kw)
    u1 = op("R1", "gconv_3x3", x, stride=2, groups=2)
    u2 = op("R2", "gconv_3x3", x, stride=2, groups=2)
    h = c // 2
    r11 = lambda v_: jnp.concatenate([op("R111", "avg_pool_3x3", v_[..., :h]),
                                      op("R112", "sep_7x7", v_[..., h:])], -1)
    r12 = lambda v_: (op("R121", "sep_3x3", v_) + op("R122", "sep_5x5", v_)) / 2
    r1 = (r11(op("R11", "conv_1x1", u1)) + r12(op("R12", "max_pool_3x3", u1))) / 2
    r21 = lambda v_: (op("R211", "sep_5x5", v_) + op("R212", "avg_pool_3x3", v_)
                      + op("R213", "avg_pool_3x3", v_)) / 3
    r22 = lambda v_: (op("R221", "avg_pool_3x3", v_) + op("R222", "sep_3x3", v_)) / 2
    r2 = (r21(op("R21", "sep_5x5", u2)) + r22(op("R22", "sep_3x3", u2))) / 2
    return (r1 + r2) / 2

  want = jax.jit(written_out)(v["params"], v["batch_stats"], x)
  got = jax.jit(functools.partial(model.apply, train=False))(v, x)
  assert got.shape == (2, 4, 4, c)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_avg_pool_excludes_padding_and_max_pool_pads_with_minus_infinity():
  x = -jnp.ones((1, 3, 3, 1))
  v = {"params": {}}
  avg = pn.EdgeOp("avg_pool_3x3", 1).apply(v, x, train=False)
  mx = pn.EdgeOp("max_pool_3x3", 1).apply(v, x, train=False)
  np.testing.assert_array_equal(avg, x)  # zero padding counted would give -4/9 in a corner
  np.testing.assert_array_equal(mx, x)  # zero padding would give 0


def test_drop_path_zeroes_or_rescales_a_whole_branch():
  y = jnp.arange(1.0, 7.0).reshape(1, 1, 2, 3)
  outs = np.stack([pn.drop_branch(y, 0.25, jax.random.key(i)) for i in range(400)])
  dropped = np.all(outs == 0, axis=(1, 2, 3, 4))
  np.testing.assert_allclose(outs[~dropped], np.broadcast_to(y / 0.75, outs[~dropped].shape),
                             rtol=1e-6)
  # Binomial(400, 0.25): mean 100, sd 8.7; 5 sd either side.
  assert 56 < dropped.sum() < 144
  np.testing.assert_array_equal(pn.drop_branch(y, 0.0, jax.random.key(0)), y)


def test_pyramidnet_forward_shapes_and_drop_path_only_in_training():
  model = pn.create_pyramidnet("tree_cell_b", 1, 4, 2, num_classes=7, dw_impl="shift")
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  v = helpers.jit_init(model, jax.random.key(1), x, train=False)
  # Compiled: run eagerly, every op of the first call would be compiled on its own.
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  logits, aux = apply(v, x, train=False, drop_prob=0.5)
  assert logits.shape == (2, 7) and aux is None
  again, _ = apply(v, x, train=False)
  np.testing.assert_array_equal(logits, again)  # eval mode: no drop
  (a, _), _ = apply(v, x, train=True, drop_prob=0.0, rngs={"dropout": jax.random.key(3)},
                    mutable=("batch_stats",))
  (b, _), _ = apply(v, x, train=True, mutable=("batch_stats",))
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- the tree cell as data ------------------------------------------------------------------------


MULTI_OP = tree.TreeCell(tree.node(
    "none", tree.edge("gconv_3x3", tree.node(
        "add", tree.edge(("sep_3x3", "identity"), tree.node("none", tree.leaf("max_pool_3x3"))),
        tree.leaf("conv_1x1", "avg_pool_3x3", "sep_7x7")))))


@pytest.mark.parametrize("cell", [tree.TREE_CELL_A, tree.TREE_CELL_B, tree.PLAIN_CELL, MULTI_OP])
def test_tree_cell_round_trips_through_json(cell, tmp_path):
  assert tree.TreeCell.from_json(cell.to_json()) == cell
  path = str(tmp_path / "cell.json")
  cell.save(path)
  assert tree.TreeCell.load(path) == cell
  assert tree.load_tree_cell(path) == cell
  assert tree.is_tree_cell_json(path)
  assert json.loads(cell.to_json())["kind"] == "tree_cell"


def test_tree_cell_a_structure_matches_the_spec_node_table():
  a = tree.TREE_CELL_A
  ops = sorted(op for _, _, b, _ in a.edges() for op in b.ops)
  assert a.num_edges == 15 and a.depth == 3
  assert ops.count("gconv_3x3") == 2 and ops.count("avg_pool_3x3") == 4
  assert ops.count("sep_5x5") == 3 and ops.count("sep_3x3") == 3 and ops.count("sep_7x7") == 1
  widths = {p: (i, o) for p, i, o, _ in a.edge_widths(40)}
  assert widths["R111"] == (20, 20) and widths["R112"] == (20, 20)  # the concat-split node R11
  assert all(w == (40, 40) for p, w in widths.items() if p[:3] != "R11" or len(p) == 3)


@pytest.mark.parametrize("bad,match", [
    (lambda: tree.TreeCell(tree.node("none", tree.leaf("sep_3x3"))), "root edges"),
    (lambda: tree.TreeCell(tree.node("none", tree.edge("gconv_3x3", tree.node(
        "none", tree.leaf("gconv_3x3"))))), "use ops from"),
    (lambda: tree.TreeCell(tree.node("none", tree.edge("gconv_3x3", tree.node(
        "concat", tree.leaf("identity"), tree.leaf("sep_3x3"), allocation="copy")))),
     "cannot"),
    (lambda: tree.node("add", tree.leaf("sep_3x3")), "exactly one branch"),
    (lambda: tree.TreeCell.from_dict({"kind": "tree_cell", "format_version": 1,
                                      "root": {"merge": "none"}}), "malformed"),
    (lambda: tree.TreeCell.from_dict({"space": "darts"}), "kind"),
    (lambda: tree.load_tree_cell("no_such_cell"), "neither a registered"),
])
def test_bad_tree_cells_are_rejected_with_a_named_reason(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


def test_tree_cell_picture_through_genotype_plot(tmp_path):
  png, svg = genotype_lib.plot(tree.TREE_CELL_A, str(tmp_path / "a" / "cell"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(svg) as f:
    assert "<svg" in f.read()


# ---- the template, the switch layout and the prior ----------------------------------------------


def test_template_topology_is_the_complete_binary_tree():
  sp = spaces.get_space("tree")
  topo = sp.cells["tree"]
  assert sp.ops == tree.EDGE_OPS and sp.group_shape("tree") == (12, 8)
  assert topo.num_inputs == 2 and topo.num_nodes == 5 and topo.concat == (6,)
  by_name = {e.name: (e.source, e.target) for e in topo.edges}
  assert by_name["R11"] == (0, 2) and by_name["R22"] == (1, 5)
  assert by_name["R111"] == (2, 6) and by_name["R222"] == (5, 6)  # leaves enter the output node
  assert supernet_lib.cell_counts("tree", 18) == {"tree": 54}
  assert sp.switch_shapes({"tree": 54}) == {"tree": (54, 12, 8)}


def test_supernet_parameter_count_matches_the_spec_oracle():
  # Spec 4.3.6: N = 18, alpha = 84, G = 2, complete binary template, all 7 ops on the 12 searched
  # edges: 17,499,378 (the search-only batch norms are non-affine: no parameters).
  model = supernet_lib.create_supernet("tree", 16, 18, 10, alpha=84.0, groups=2, dw_impl="shift")
  sw = {"tree": jax.ShapeDtypeStruct((54, 12, 8), jnp.float32)}
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda k, im, s: model.init(k, im, s, train=False), jax.random.key(0),
                          x, sw)["params"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes)) == 17_499_378


def _path_index(sp):
  return {e.path: i for i, e in enumerate(sp.template.edges)}


def test_prior_update_kills_the_subtree_of_a_dead_edge_and_the_edge_above_a_dead_node():
  sp = spaces.get_space("tree")
  idx = _path_index(sp)
  n = 3
  switches = {"tree": jnp.ones((n, 12, 8))}
  state = bayes.init(switches)
  sw = np.ones((n, 12, 8), np.float32)
  sw[:, idx["R11"], 0] = 0.0  # top-down: R11's origin -> R111, R112 die with it
  sw[:, idx["R211"], 1:] = 0.0  # bottom-up: both branches of R21 lose every op ...
  sw[:, idx["R212"], 1:] = 0.0  # ... so the edge into R21 dies
  h = {"tree": jnp.ones((n, 12, 8))}
  new = bayes.update(state, {"tree": jnp.asarray(sw)}, h, lambda_origin=0.01, lambda_op=0.01,
                     prune_threshold=1e-3, cells=sp.cells)
  alive = np.asarray(new.alive["tree"])
  dead = {"R11", "R111", "R112", "R21", "R211", "R212"}
  for path, i in idx.items():
    assert bool(alive[i, 0]) == (path not in dead), path
    if path in dead:
      assert not alive[i].any(), path
  cell = tree.derive(sp, new.alive)
  # Derived paths number the kept branches per node: R1 keeps only its second template child
  # (R12 -> derived R11, with R121/R122 -> R111/R112), R2 only its second (R22 -> R21).
  assert {p for p, _, _, _ in cell.edges()} == {"R1", "R2", "R11", "R111", "R112", "R21", "R211",
                                                 "R212"}
  assert cell.root.branches[0].child.merge == "none"
  assert all(len(b.ops) == 7 for p, _, b, d in cell.edges() if d > 1)


def test_dead_parent_removes_its_subtree_from_the_supernet():
  """With R11's origin dead, one block's switched tree (`tree_supernet.SupernetCell`) depends
  neither on the switches below R11 (zero gradient) nor on its subtree's parameters, and equals
  the unpruned tree with those switches at 0 (R12's origin doubled for R1's mean over 1 branch)."""
  sp = spaces.get_space("tree")
  idx = _path_index(sp)
  edge_alive = np.ones(12, bool)
  edge_alive[idx["R11"]] = False
  edge_alive = np.asarray(bayes.connected_edges(sp.cells["tree"], jnp.asarray(edge_alive)))
  assert not edge_alive[[idx["R111"], idx["R112"]]].any() and edge_alive.sum() == 9
  rows = spaces.freeze_mask({"tree": edge_alive[:, None] & np.ones((12, 8), bool)})[0][1]
  full = tree_supernet.SupernetCell("tree", 4, 1, 2, None, "lax")  # "lax": the fastest compile
  pruned = full.clone(alive=rows)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  sw = jnp.ones((12, 8))
  v = helpers.jit_init(full, jax.random.key(1), x, train=False, sw=sw)

  def loss(switches, params):
    out, _ = pruned.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                          sw=switches, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  g_sw, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(sw, v["params"])
  for path in ("R11", "R111", "R112"):
    np.testing.assert_array_equal(g_sw[idx[path]], 0.0)
  assert float(jnp.abs(g_sw[idx["R121"]]).sum()) > 0
  flat = flax.traverse_util.flatten_dict(g_p["edges"])  # leading axis: the 12 searched edges
  assert len(flat) > 10
  for path in ("R11", "R111", "R112"):
    assert all(float(jnp.abs(g[idx[path]]).sum()) == 0.0 for g in flat.values()), path
  assert all(float(jnp.abs(g[idx["R121"]]).sum()) > 0 for g in flat.values())
  full_fn = jax.jit(lambda s: full.apply(v, x, train=True, sw=s, mutable=["batch_stats"])[0])
  sw0 = sw.at[idx["R11"], 0].set(0.0)
  a = pruned.apply(v, x, train=True, sw=sw, mutable=["batch_stats"])[0]
  assert not np.allclose(a, full_fn(sw0))  # the unpruned mean still divides R1 by 2 branches
  np.testing.assert_allclose(a, full_fn(sw0.at[idx["R12"], 0].set(2.0)), rtol=2e-4, atol=2e-5)


def _reference_cell(variables, x, sw, alive, *, train, c, stride, groups, dw_impl="lax"):
  """One block's switched tree written edge by edge from the `tree_supernet` docstring:
  ``z_e = sum_o s[e, 1 + o] * BN0(op_o(x_parent))``, branch ``s[e, 0] * child(z_e)``, node = mean
  of its live branches, cell = mean of the live root branches; each op applied alone with its row
  of the stacked parameters (``params['edges'][op][e]``)."""
  sp = spaces.get_space("tree")
  tmpl = sp.template
  live = tree_supernet.live_edges(tmpl, alive)
  params, stats = variables["params"], variables["batch_stats"]
  row = lambda t, e: jax.tree.map(lambda a: a[e], t)
  bc = lambda v: v if v.ndim == 0 else v[:, None, None, None]

  def edge(e, xp):
    out = 0.0
    for k, op in enumerate(tree.EDGE_OPS):
      if alive[e, 1 + k]:
        y, _ = pn.EdgeOp(op, c, 1, 1, dw_impl, search_bn=True).apply(
            {"params": row(params["edges"].get(op, {}), e),
             "batch_stats": row(stats["edges"][op], e)}, xp, train=train, mutable=["batch_stats"])
        out = out + bc(sw[..., e, 1 + k]) * y
    return out

  def node(parent, xp):
    outs = [bc(sw[..., e, 0]) * (edge(e, xp) if tmpl.edges[e].leaf
                                  else node(tmpl.edges[e].path, edge(e, xp)))
            for e in tmpl.children(parent) if live[e]]
    return sum(outs) / len(outs)

  outs = []
  for j, child in enumerate(tmpl.root_children):
    if any(live[e] for e in tmpl.children(child)):
      name = f"R{j + 1}_{tree.ROOT_OP}"
      u, _ = pn.EdgeOp(tree.ROOT_OP, c, stride, groups, dw_impl).apply(
          {"params": params[name], "batch_stats": stats[name]}, x, train=train,
          mutable=["batch_stats"])
      outs.append(node(child, u))
  return sum(outs) / len(outs)


@pytest.mark.parametrize("pruned_ops,masked", [("skip", False), ("skip", True), ("mask", True)])
def test_scanned_supernet_cell_equals_the_edge_by_edge_formula(pruned_ops, masked):
  """The stacked parameters and per-depth scans of `tree_supernet.SupernetCell` compute the
  edge-by-edge formula (train and eval batch norm, shared and per-example switches, stride 2),
  unpruned and under a mask with a dead origin, a dead edge, a dead subtree and single dead ops,
  in both pruned-op formulations; the batch statistics of computed ops are updated alike."""
  sp = spaces.get_space("tree")
  idx = _path_index(sp)
  alive = np.ones((12, 8), bool)
  if masked:
    alive[idx["R11"], 0] = False  # top-down: R111, R112 unreached
    alive[idx["R221"], 1:] = False  # a leaf with no live op
    alive[idx["R121"], 3] = False  # single ops
    alive[idx["R22"], 5] = False
  rows = spaces.freeze_mask({"tree": alive})[0][1] if masked else None
  cell = tree_supernet.SupernetCell("tree", 4, 2, 2, rows, "lax", pruned_ops)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  sw = jax.random.uniform(jax.random.key(2), (12, 8), minval=0.5, maxval=1.5)
  v = helpers.jit_init(tree_supernet.SupernetCell("tree", 4, 2, 2, None, "lax"),
                       jax.random.key(1), x, train=False, sw=sw)
  assert v["params"]["edges"]["sep_7x7"]["depthwise"].shape == (12, 7, 7, 4)
  for train in (False, True):
    for s in (sw, jnp.stack([sw, 2.0 * sw])):
      got, new_stats = cell.apply(v, x, train=train, sw=s, mutable=["batch_stats"])
      want = _reference_cell(v, x, s, alive, train=train, c=4, stride=2, groups=2)
      assert got.shape == (2, 4, 4, 4)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if masked:  # R22's depth-1 edge is live: its batch statistics moved; R111's did not
    mean = new_stats["batch_stats"]["edges"]["conv_1x1"]["bn"]["mean"]
    old = v["batch_stats"]["edges"]["conv_1x1"]["bn"]["mean"]
    assert not np.allclose(mean[idx["R22"]], old[idx["R22"]])
    if pruned_ops == "skip":
      np.testing.assert_array_equal(mean[idx["R111"]], old[idx["R111"]])


def test_tree_supernet_needs_the_static_mask_formulations():
  sp = spaces.get_space("tree")
  for ok in ("skip", "mask"):
    assert tree_supernet.create_tree_supernet(sp, 16, 1, 10, alpha=0.0, dw_impl="lax",
                                              pruned_ops=ok).pruned_ops == ok
  with pytest.raises(ValueError, match="pruned_ops='zero'"):
    tree_supernet.create_tree_supernet(sp, 16, 1, 10, alpha=0.0, dw_impl="lax", pruned_ops="zero")


# ---- derivation -----------------------------------------------------------------------------------




@pytest.mark.parametrize("name", ["tree", "tree_tiny"])
def test_derivation_is_a_valid_tree_on_adversarial_masks(name):
  """Random masks, including a live child under a dead edge and an origin without live ops: the
  derived cell is valid, keeps exactly the edges `bayes.connected_edges` keeps, with their
  alive ops, and falls back to one best path when nothing is left."""
  sp = spaces.get_space(name)
  tmpl, topo = sp.template, sp.cells["tree"]
  e, k = sp.group_shape("tree")
  rng = np.random.default_rng(0)
  for trial in range(300):
    p_alive = rng.choice([0.15, 0.4, 0.7, 0.95])
    alive = rng.random((e, k)) < p_alive
    scores = rng.random((e, k))
    live_edges = np.asarray(bayes.connected_edges(
        topo, jnp.asarray(alive[:, 0] & alive[:, 1:].any(1))))
    if not live_edges.any():
      cell = tree.derive(sp, {"tree": alive}, {"tree": scores})
      tree.check_valid(cell, tmpl)
      assert all(n.merge == "none" for _, n, d in cell.nodes() if d > 0)  # one chain
      assert cell.depth == len(tmpl.branches)
      with pytest.raises(ValueError, match="no scores"):
        tree.derive(sp, {"tree": alive})
      continue
    cell = tree.derive(sp, {"tree": alive}, {"tree": scores})
    tree.check_valid(cell, tmpl)
    # Map the derived branches back to template edges: walk both trees in parallel.
    kept = {}

    def walk(n, parent):
      children = [i for i in tmpl.children(parent) if live_edges[i]]
      assert len(children) == len(n.branches), (trial, parent)
      for i, b in zip(children, n.branches):
        kept[tmpl.edges[i].path] = b.ops
        assert b.ops == tuple(op for j, op in enumerate(sp.ops) if alive[i, 1 + j])
        if tmpl.edges[i].leaf:
          assert b.child is None
        else:
          walk(b.child, tmpl.edges[i].path)

    roots = [p for p in tmpl.root_children
             if any(live_edges[i] for i in tmpl.children(p))]
    assert len(cell.root.branches) == len(roots)
    for p, b in zip(roots, cell.root.branches):
      walk(b.child, p)
    assert set(kept) == {tmpl.edges[i].path for i in np.nonzero(live_edges)[0]}


def test_derivation_through_genotype_derive_and_max_ops():
  sp = spaces.get_space("tree")
  alive = np.ones((12, 8), bool)
  scores = np.tile(np.arange(8.0), (12, 1))
  full = genotype_lib.derive(sp, {"tree": alive}, {"tree": scores})
  assert full.num_edges == 14 and all(len(b.ops) == 7 for p, _, b, d in full.edges() if d > 1)
  capped = genotype_lib.derive(sp, {"tree": alive}, {"tree": scores}, max_ops=1)
  assert {b.ops for _, _, b, d in capped.edges() if d > 1} == {("avg_pool_3x3",)}
  with pytest.raises(ValueError, match="shape"):
    tree.derive(sp, {"tree": alive[:3]})
