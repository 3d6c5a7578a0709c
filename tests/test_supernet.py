"""Tests of the supernet (bnas_jax.models.supernet): counts, switch semantics, pruning, per-example switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax.models import supernet as sn
from bnas_jax.search_space import spaces

import helpers


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _abstract_params(space, c, n):
  model = sn.create_supernet(space, c, n, 10)
  sw = sn.init_switches(space, n)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), sw,
                                        train=True))
  return v, sw


def _bayesnas_closed_form(c0, n, classes=10):
  """Independent count from spec 2.1-2.4: conv = out*in/groups*k*k, BN = 2C, Linear with bias."""
  def edge(c, stride):
    sep = lambda k: 2 * (2 * c + k * k * c + c * c)
    dil = lambda k: 2 * c + k * k * c * c + c * c
    return sep(3) + sep(5) + dil(3) + dil(5) + (2 * c + c * c if stride == 2 else 0)

  def creduct(ci, co, strided):
    return (ci * ci if strided else 0) + 2 * ci + ci * co

  total, cpp, cp, c, red_prev = 27 * 3 * c0, 3 * c0, 3 * c0, c0, False
  for i in range(n):
    red = i in (n // 3, 2 * n // 3)
    c = 2 * c if red else c
    total += creduct(cpp, c, red_prev) + creduct(cp, c, False)
    total += 5 * edge(c, 2) + 3 * edge(c, 1) if red else 8 * edge(c, 1)
    cpp, cp, red_prev = cp, 4 * c, red
  return total + 2 * cp + cp * classes + classes


def test_official_bayesnas_counts():
  v, sw = _abstract_params("bayesnas", 36, 8)
  assert {t: s.shape for t, s in sw.items()} == {"normal": (6, 8, 8), "reduce": (2, 8, 8)}
  assert _count(sw) == 512  # spec 2.2: (6 + 2) cells x 8 edges x 8 switches
  # Anchor: the official PyTorch search supernet has 26,910,838 weights (reference_numbers.md).
  assert _count(v["params"]) == 26_910_838 == _bayesnas_closed_form(36, 8)
  v8, _ = _abstract_params("bayesnas", 8, 8)
  assert _count(v8["params"]) == _bayesnas_closed_form(8, 8) == 1_412_162  # "1.41 M"


def test_cell_plan_and_switch_shapes():
  chans = [s.channels for s in sn.cell_plan("bayesnas", 36, 8)]
  assert chans == [36, 36, 72, 72, 72, 144, 144, 144]
  assert [s.cell_type for s in sn.cell_plan("bayesnas", 36, 8)] == [
      "normal", "normal", "reduce", "normal", "normal", "reduce", "normal", "normal"]
  assert sn.cell_counts("darts", 8) == {"normal": 6, "reduce": 2}
  assert sn.cell_counts("nb201", 5) == {"normal": 15}
  assert sn.init_switches("darts", 5)["reduce"].shape == (2, 14, 8)
  assert sn.init_switches("nb201", 2)["normal"].shape == (6, 6, 5)


@pytest.mark.parametrize("space,n", [("darts", 3), ("nb201", 1)])
def test_other_spaces_shapes(space, n):
  model = sn.create_supernet(space, 4, n, 7)
  sw = sn.init_switches(space, n)
  x = jnp.zeros((2, 16, 16, 3))

  def run():
    v = model.init(jax.random.key(0), x, sw, train=True)
    return model.apply(v, x, sw, train=True, mutable=["batch_stats"])[0]

  assert jax.eval_shape(run).shape == (2, 7)


def test_bad_switches_raise():
  model = sn.create_supernet("bayesnas", 4, 3, 10)
  sw = sn.init_switches("bayesnas", 3)
  bad = {"normal": sw["normal"], "reduce": jnp.ones((2, 8, 7))}
  with pytest.raises(ValueError, match="switches\\['reduce'\\]"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), bad, train=True))


# ------------------------------------------------------------------------------------------------
# Numerical switch semantics on a tiny bayesnas supernet (N, R, R cells, C = 4, 8 x 8 images).

N_CELLS, C0, B = 3, 4, 4
DROP_OP = {"normal": (0, 1 + 2), "reduce": (6, 1 + 0)}  # (edge, switch index) of one op
DROP_EDGE = {"normal": 7, "reduce": 3}  # edge whose origin is pruned (edges from node 2)


@pytest.fixture(scope="module")
def tiny():
  sp = spaces.get_space("bayesnas")
  # 'lax' depthwise compiles fastest; 'shift' == 'lax' is tested in test_ops.py.
  model = sn.create_supernet(sp, C0, N_CELLS, 10, dw_impl="lax")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(B, 8, 8, 3)), jnp.float32)
  sw = {t: jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape), jnp.float32)
        for t, s in sn.init_switches(sp, N_CELLS).items()}
  variables = sn.init_variables(model, jax.random.key(1), images, sw)
  fwd = jax.jit(lambda v, s, x: model.apply(v, x, s, train=True, mutable=["batch_stats"])[0])
  return sp, model, images, sw, variables, fwd


@pytest.mark.parametrize("pruned_ops", ["skip", "mask"])
def test_zero_switch_equals_pruned_supernet(tiny, pruned_ops):
  sp, _, images, sw, variables, fwd = tiny
  mask = spaces.full_mask(sp)
  zeroed = dict(sw)
  for t in sw:
    e, k = DROP_OP[t]
    mask[t][e, k] = False
    zeroed[t] = zeroed[t].at[:, e, k].set(0.0)
    mask[t][DROP_EDGE[t], 0] = False
    zeroed[t] = zeroed[t].at[:, DROP_EDGE[t], 0].set(0.0)
  pruned = sn.create_supernet(sp, C0, N_CELLS, 10, alive=spaces.freeze_mask(mask), dw_impl="lax",
                              pruned_ops=pruned_ops)
  # The pruned net reads the same variables (its parameter tree does not depend on `alive`).
  out_pruned = jax.jit(lambda v, s, x: pruned.apply(v, x, s, train=True,
                                                    mutable=["batch_stats"])[0])(
                                                        variables, sw, images)
  out_zeroed = fwd(variables, zeroed, images)
  out_full = fwd(variables, sw, images)
  np.testing.assert_allclose(out_zeroed, out_pruned, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(out_full - out_zeroed)) > 1e-4  # the dropped op and edge did matter
  # Zeroing the origin switch of an edge == zeroing all of that edge's op switches.
  all_ops = {t: s.at[:, DROP_EDGE[t], 1:].set(0.0) for t, s in sw.items()}
  origin = {t: s.at[:, DROP_EDGE[t], 0].set(0.0) for t, s in sw.items()}
  np.testing.assert_allclose(fwd(variables, origin, images), fwd(variables, all_ops, images),
                             rtol=1e-5, atol=1e-6)


def test_per_example_switches_equal_shared(tiny):
  _, _, images, sw, variables, fwd = tiny
  per_ex = {t: jnp.broadcast_to(s, (B, *s.shape)) for t, s in sw.items()}
  np.testing.assert_allclose(fwd(variables, per_ex, images), fwd(variables, sw, images),
                             rtol=1e-5, atol=1e-6)


def test_shift_vjp_supernet_equals_lax_in_values_grads_and_ggn_fast(tiny):
  # The runner trains with 'shift_vjp' depthwise convs (custom VJP) and computes the default
  # ggn_fast curvature (per-example VJPs) through them; both must equal the lax reference.
  from bnas_jax import curvature  # pylint: disable=import-outside-toplevel
  sp, model, images, sw, variables, _ = tiny
  fast = sn.create_supernet(sp, C0, N_CELLS, 10, dw_impl="shift_vjp")
  labels = jnp.arange(B) % 10

  def apply_fn(m):
    return lambda v, s, x: m.apply(v, x, s, train=True, mutable=["batch_stats"])[0]

  def loss(m, params, s):
    logits = apply_fn(m)({**variables, "params": params}, s, images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), labels])

  ref = jax.jit(jax.grad(lambda p, s: loss(model, p, s), argnums=(0, 1)))(variables["params"], sw)
  got = jax.jit(jax.grad(lambda p, s: loss(fast, p, s), argnums=(0, 1)))(variables["params"], sw)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  batch = {"image": images, "label": labels}
  h_ref = jax.jit(lambda s: curvature.ggn_fast(apply_fn(model), s, variables, batch))(sw)
  h_got = jax.jit(lambda s: curvature.ggn_fast(apply_fn(fast), s, variables, batch))(sw)
  for t in sw:
    np.testing.assert_allclose(h_got[t], h_ref[t], rtol=1e-3, atol=1e-6)
  with pytest.raises(TypeError, match="custom_vjp"):  # hence the runner's 'shift' curvature net
    jax.jvp(lambda s: apply_fn(fast)(variables, s, images), (sw,), (sw,))


# ------------------------------------------------------------------------------------------------
# The edge loop (Cell: lax.scan over edges with stacked parameters) against a per-edge reference.


def _cell_case(space, cell_type, edge_loop="scan", alive=None, dw_impl="lax"):
  sp = spaces.get_space(space)
  topo = sp.cells[cell_type]
  c, hw = 4, 8
  rng = np.random.default_rng(3)
  inputs = tuple(jnp.asarray(rng.normal(size=(2, hw, hw, c)), jnp.float32)
                 for _ in range(topo.num_inputs))
  sw = jnp.asarray(rng.uniform(0.5, 1.5, size=sp.group_shape(cell_type)), jnp.float32)
  cell = sn.Cell(space, c, cell_type, alive, False, dw_impl, edge_loop)
  variables = helpers.jit_init(cell, jax.random.key(0), inputs, sw, train=True)
  return sp, topo, cell, variables, inputs, sw


@pytest.mark.parametrize("space,cell_type", [("darts", "normal"), ("darts", "reduce"),
                                             ("bayesnas", "reduce"), ("nb201", "normal")])
def test_cell_equals_per_edge_reference(space, cell_type):
  # Reference: node_t = sum over edges e -> t of EdgeOps(params of e)(node_source(e)), evaluated
  # edge by edge in Python with each edge's slice of the stacked parameters (spec 2.1).
  sp, topo, cell, variables, inputs, sw = _cell_case(space, cell_type)
  got = jax.jit(lambda v: cell.apply(v, inputs, sw, train=True))(variables)
  n_in = topo.num_inputs
  order = sorted(range(len(topo.edges)), key=lambda i: (topo.edges[i].target,
                                                         topo.edges[i].source))
  phases = ({"edges_in": [i for i in order if topo.edges[i].source < n_in],
             "edges": [i for i in order if topo.edges[i].source >= n_in]}
            if topo.reduction else {"edges": order})
  nodes = dict(enumerate(inputs))
  for i in order:  # sources are complete before they are read: edges are sorted by target
    e = topo.edges[i]
    pname = next(p for p, ids in phases.items() if i in ids)
    pos = phases[pname].index(i)
    mod = sn.EdgeOps(sp.family, tuple(sp.ops), 4, topo.stride(e), None, False, "lax")
    take = lambda t, pos=pos: jax.tree.map(lambda a: a[pos], t)
    y = mod.apply({"params": take(variables["params"][pname]),
                   "batch_stats": take(variables["batch_stats"][pname])},
                  nodes[e.source], sw[i], train=True)
    nodes[e.target] = nodes[e.target] + y if e.target in nodes else y
  ref = jnp.concatenate([nodes[t] for t in topo.concat], axis=-1)
  assert got.shape == ref.shape
  # Sums of up to 5 edges of magnitude ~100 in another order: float32 rounding ~1e-6 relative.
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def _loss_grads_and_stats(cell, variables, inputs, sw):
  """((sum of squared cell outputs, updated batch stats), (weight grads, switch grads))."""

  def run(params, s):
    out, upd = cell.apply({**variables, "params": params}, inputs, s, train=True,
                          mutable=["batch_stats"])
    return jnp.sum(out ** 2), upd["batch_stats"]

  return jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(variables["params"], sw)


def test_unrolled_edge_loop_equals_scan_with_gradients_and_stats():
  # bayesnas reduction cell: stride-2 and stride-1 phases, dense dilated convs, batch statistics
  # updated through the loop.
  _, _, scan, variables, inputs, sw = _cell_case("bayesnas", "reduce")
  res = [_loss_grads_and_stats(m, variables, inputs, sw)
         for m in (scan, scan.clone(edge_loop="unroll"))]
  for a, b in zip(jax.tree.leaves(res[0]), jax.tree.leaves(res[1])):  # float32 rounding only
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
  stats = res[0][0][1]
  assert not np.allclose(jax.tree.leaves(stats)[0], jax.tree.leaves(variables["batch_stats"])[0])
  with pytest.raises(ValueError, match="edge_loop='while'"):
    sn.create_supernet("darts", 4, 3, 10, edge_loop="while")


def test_remat_equals_stored_activations():
  # Recomputing each edge in the backward pass (Cell.remat, the default) changes nothing: output,
  # weight and switch gradients and updated batch statistics equal those of the stored-activation
  # graph. A darts normal cell with the custom-VJP depthwise convs of the CPU path.
  _, _, remat, variables, inputs, sw = _cell_case("darts", "normal", dw_impl="shift_vjp")
  assert remat.remat
  res = [_loss_grads_and_stats(m, variables, inputs, sw)
         for m in (remat, remat.clone(remat=False))]
  for a, b in zip(jax.tree.leaves(res[0]), jax.tree.leaves(res[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))
  assert float(np.max(np.abs(res[0][1][1]))) > 0  # the switch gradient is not trivially zero


def _avg_pool_3x3_ref(y):
  """count_include_pad=False average over the 3 x 3 window, stride 1, of f64[B, H, W, C]."""
  h, w = y.shape[1:3]
  pad = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ones = np.pad(np.ones_like(y), ((0, 0), (1, 1), (1, 1), (0, 0)))
  win = lambda a: sum(a[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
  return win(pad) / win(ones)


def test_param_free_bn_normalises_skip_and_pool_outputs():
  # With param_free_bn, an nb201 edge is sum_k s_k BN(op_k(s_0 x)) for the parameter-free ops too:
  # only skip_connect (or only avg_pool_3x3) switched on, in train mode, gives the per-channel
  # batch-normalised identity (or pool) of s_0 x, closed form mean 0 / variance 1 (eps 1e-5).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(4, 6, 6, 5)), jnp.float32)
  sp = spaces.get_space("nb201")
  mod = sn.EdgeOps(sp.family, tuple(sp.ops), 5, 1, None, False, "lax", "lax", True)
  variables = helpers.jit_init(mod, jax.random.key(0), x, jnp.ones(1 + len(sp.ops)), train=True)
  assert {"skip_connect_bn", "avg_pool_3x3_bn"} <= set(variables["batch_stats"])
  for k, name in enumerate(sp.ops):
    if name not in ("skip_connect", "avg_pool_3x3"):
      continue
    s = np.zeros(1 + len(sp.ops), np.float32)
    s[0], s[1 + k] = 0.5, 2.0
    got, _ = mod.apply(variables, x, jnp.asarray(s), train=True, mutable=["batch_stats"])
    y = 0.5 * np.asarray(x, np.float64)
    if name == "avg_pool_3x3":
      y = _avg_pool_3x3_ref(y)
    ref = 2.0 * (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # Off (the default), the identity passes s_0 x through unchanged.
  plain = sn.EdgeOps(sp.family, tuple(sp.ops), 5, 1, None, False, "lax", "lax")
  pv = helpers.jit_init(plain, jax.random.key(0), x, jnp.ones(1 + len(sp.ops)), train=True)
  s = np.zeros(1 + len(sp.ops), np.float32)
  s[0], s[1 + sp.ops.index("skip_connect")] = 0.5, 2.0
  np.testing.assert_allclose(plain.apply(pv, x, jnp.asarray(s), train=True,
                                         mutable=["batch_stats"])[0], 1.0 * x, rtol=1e-6)
  with pytest.raises(ValueError, match="param_free_bn"):
    sn.create_supernet("tree_tiny", 8, 1, 10, param_free_bn=True)


def test_pool_bn_normalises_the_pool_only():
  # pool_bn: BN(affine=False) after the pools only (the DARTS convention): the average pool's
  # output is batch-normalised per channel (closed form), the identity skip passes s_0 x through.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(-1.0, 2.0, size=(4, 6, 6, 5)), jnp.float32)
  sp = spaces.get_space("nb201")
  mod = sn.EdgeOps(sp.family, tuple(sp.ops), 5, 1, None, False, "lax", "lax", False, True)
  variables = helpers.jit_init(mod, jax.random.key(0), x, jnp.ones(1 + len(sp.ops)), train=True)
  assert "avg_pool_3x3_bn" in variables["batch_stats"]
  assert "skip_connect_bn" not in variables["batch_stats"]
  s = np.zeros(1 + len(sp.ops), np.float32)
  s[0], s[1 + sp.ops.index("avg_pool_3x3")] = 0.5, 2.0
  got, _ = mod.apply(variables, x, jnp.asarray(s), train=True, mutable=["batch_stats"])
  y = _avg_pool_3x3_ref(0.5 * np.asarray(x, np.float64))
  ref = 2.0 * (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  s = np.zeros(1 + len(sp.ops), np.float32)
  s[0], s[1 + sp.ops.index("skip_connect")] = 0.5, 2.0
  np.testing.assert_allclose(mod.apply(variables, x, jnp.asarray(s), train=True,
                                       mutable=["batch_stats"])[0], 1.0 * x, rtol=1e-6)
  # The whole supernet threads the option down to every edge; the tree spaces refuse it.
  net = sn.create_supernet("nb201", 4, 1, 10, pool_bn=True)
  v = sn.init_variables(net, jax.random.key(0), jnp.zeros((2, 8, 8, 3)),
                        {"normal": jnp.ones((3, 6, 5))})
  names = {"/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(v["batch_stats"])}
  assert any("avg_pool_3x3_bn" in n for n in names)
  assert not any("skip_connect_bn" in n for n in names)
  with pytest.raises(ValueError, match="pool_bn"):
    sn.create_supernet("tree_tiny", 8, 1, 10, pool_bn=True)
