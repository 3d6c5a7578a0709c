"""Networks, counts, switches, hierarchy and export of network compression (compression spec 1-3, 8).

Oracles: the [COMPUTED] counts of compression spec section 8 (independent arithmetic from the layer
sizes), the parameter trees Flax builds, closed forms of the series-variance hierarchy, and the
masked network itself for the export equivalence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import bayes
from bnas_jax import curvature
from bnas_jax.compression import export
from bnas_jax.compression import groups
from bnas_jax.compression import networks
from bnas_jax.compression import train


# ------------------------------------------------------------------------------------------------
# Counts (spec 8).


@pytest.mark.parametrize("arch, params, weights, macs", [
    (networks.lenet300_100(), 266_610, 266_200, 266_200),
    (networks.lenet500_300(), 545_810, 545_000, 545_000),
    (networks.lenet5(), 431_080, 430_500, 2_293_000),
    (networks.lenet5(padding="SAME"), 1_256_080, None, None),
    (networks.vgg_like(), 14_991_946, None, 313_463_808),
    (networks.vgg_like(conv_bias=False), 14_987_722, None, 313_463_808),
])
def test_counts_match_spec_oracles_and_parameter_tree(arch, params, weights, macs):
  c = networks.count(arch)
  assert c["params"] == params
  if weights is not None:
    assert c["weights"] == weights
  if macs is not None:
    assert c["macs"] == macs
  tree = jax.eval_shape(lambda: networks.init_variables(arch, jax.random.key(0)))
  assert networks.count_tree(tree) == {"weights": c["weights"], "params": c["params"]}


def _li_vgg16(widths, fc_width=512):
  arch = networks.vgg_like(widths=widths, fc_width=fc_width, conv_bias=False, dropout=False)
  convs = arch.convs[:-1] + (dataclasses.replace(arch.convs[-1], pool="avg"),)
  return dataclasses.replace(arch, convs=convs)


def test_li_vgg16_and_pruned_a_and_vgg19_bn():
  full = _li_vgg16(networks.VGG_LIKE_WIDTHS)
  assert networks.count(full)["params"] == 14_987_722
  assert networks.count(full)["macs"] == 313_463_808
  pruned_a = _li_vgg16((32, 64, 128, 128, 256, 256, 256) + (256,) * 6)
  assert networks.count(pruned_a)["params"] == 5_397_034
  assert networks.count(pruned_a)["macs"] == 206_279_680
  widths = (64, 64, 128, 128) + (256,) * 4 + (512,) * 8
  pools = {1, 3, 7, 11}
  convs = tuple(networks.ConvLayer(w, 3, "SAME", "max" if i in pools else ("avg" if i == 15 else None))
                for i, w in enumerate(widths))
  vgg19 = networks.Arch("vgg19_bn", (32, 32, 3), convs, (), 10, conv_bias=False, batch_norm=True)
  assert networks.count(vgg19)["params"] == 20_035_018


@pytest.mark.parametrize("widths, weights, macs", [
    ((3, 18, 284, 283), 84_627, 212_802),
    ((8, 13, 88, 13), 4_074, 282_874),
    ((5, 10, 76, 16), 2_751, 153_376),
])
def test_lenet5_structures(widths, weights, macs):
  c1, c2, fin, f1 = widths
  arch = dataclasses.replace(networks.lenet5(widths=(c1, c2, f1)), input_index=tuple(range(fin)))
  assert networks.count(arch)["weights"] == weights
  assert networks.count(arch)["macs"] == macs
  assert networks.structure(arch) == "-".join(map(str, widths))


def test_mlp_and_vgg_structures():
  arch = dataclasses.replace(networks.lenet500_300(), dense=(160, 55), input_index=tuple(range(245)))
  assert networks.count(arch)["weights"] == networks.count(arch)["macs"] == 48_550
  assert networks.structure(arch) == "245-160-55-10"
  gnj = (63, 64, 128, 128, 245, 155, 63, 26, 24, 20, 14, 12, 11)
  arch = networks.vgg_like(widths=gnj, fc_width=15)
  assert networks.count(arch)["weights"] == 1_001_286
  assert networks.count(arch)["macs"] == 141_501_483
  assert networks.structure(arch) == "-".join(map(str, gnj + (11, 15)))
  ghs = (51, 62, 125, 128, 228, 129, 38, 13, 9, 6, 5, 6, 6)
  arch = networks.vgg_like(widths=ghs, fc_width=20)
  assert (networks.count(arch)["weights"], networks.count(arch)["macs"]) == (822_236, 121_945_424)


@pytest.mark.parametrize("arch, n", [(networks.lenet300_100(), 1_184), (networks.lenet500_300(), 1_584),
                                     (networks.lenet5(), 1_370), (networks.vgg_like(), 4_736)])
def test_group_counts(arch, n):
  assert groups.num_groups(arch) == n


def test_bad_network_name_is_named():
  with pytest.raises(ValueError, match="unknown network 'lenet6'.*lenet5"):
    networks.get_arch("lenet6")


# ------------------------------------------------------------------------------------------------
# Switch semantics (spec 2.2, 8).

SMALL_VGG = networks.vgg_like(scale=1 / 16, dropout=False)


def _random_variables(arch, seed=0):
  # One compiled program (eager, every initialiser is dispatched op by op).
  v = jax.jit(networks.init_variables, static_argnums=0)(arch, jax.random.key(seed))
  if "batch_stats" in v:  # non-trivial running statistics and BN affine
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    v["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.5 + jax.random.uniform(next(keys), x.shape)) if p[-1].key == "var"
        else 0.1 * jax.random.normal(next(keys), x.shape), v["batch_stats"])
    v["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(next(keys), x.shape)
        if p[0].key.startswith("bn_") else x, v["params"])
  return v


@functools.lru_cache(maxsize=None)
def _logits_fn(arch):
  """The switched network's logits as one compiled program per `arch` (eagerly, each op would be
  compiled on its own)."""
  return jax.jit(lambda variables, switches, x: networks.CompressNet(arch).apply(
      variables, x, groups.unit_switches(arch, switches)))


def _logits(arch, variables, switches, x):
  return _logits_fn(arch)(variables, switches, x)


@pytest.mark.parametrize("arch, layer", [(networks.lenet5(), "conv2"), (networks.lenet300_100(), "fc1"),
                                         (SMALL_VGG, "conv5")])
def test_zero_switches_make_logits_independent_of_earlier_layers(arch, layer):
  v = _random_variables(arch)
  sw = groups.init_switches(arch)
  sw[layer] = jnp.zeros_like(sw[layer])
  x1 = jax.random.normal(jax.random.key(1), (4,) + arch.input_shape)
  x2 = jax.random.normal(jax.random.key(2), (4,) + arch.input_shape)
  a, b = _logits(arch, v, sw, x1), _logits(arch, v, sw, x2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sw[layer] = jnp.ones_like(sw[layer])  # and they do depend on the input with the layer on
  assert not np.allclose(_logits(arch, v, sw, x1), _logits(arch, v, sw, x2))


def test_one_zero_switch_equals_deleting_the_unit():
  arch = networks.lenet5()
  v = _random_variables(arch)
  sw = groups.init_switches(arch)
  sw["conv1"] = sw["conv1"].at[0, 3, 0].set(0.0)
  x = jax.random.normal(jax.random.key(3), (2,) + arch.input_shape)
  ref = jax.tree_util.tree_map(lambda t: t, v)
  ref["params"]["conv1"]["kernel"] = ref["params"]["conv1"]["kernel"].at[..., 3].set(0.0)
  ref["params"]["conv1"]["bias"] = ref["params"]["conv1"]["bias"].at[3].set(0.0)
  np.testing.assert_allclose(_logits(arch, v, sw, x),
                             networks.CompressNet(arch).apply(ref, x), rtol=1e-6, atol=1e-6)


def test_children_are_the_nhwc_flatten_units_of_their_channel():
  arch = networks.lenet5()
  sw = groups.init_switches(arch)
  sw["conv2"] = sw["conv2"].at[0, 7, 1 + 5].set(0.25)  # channel 7, position 5
  r = groups.unit_switches(arch, sw)["fc1_in"]
  assert r.shape == (800,)
  assert float(r[5 * 50 + 7]) == 0.25 and float(jnp.sum(r != 1.0)) == 1


def test_dead_switch_has_zero_ggn_diagonal_and_floor_omega(tmp_path):
  arch = networks.lenet5(widths=(4, 6, 8))
  v = _random_variables(arch)
  sw = groups.init_switches(arch)
  alive = {tau: np.ones(s.shape[1:], bool) for tau, s in sw.items()}
  alive["conv1"][1, 0] = False  # an output switch
  alive["conv2"][2, 3] = False  # one child (an input switch of fc1)
  alive["fc1"][5, 0] = False
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (6, 28, 28, 1)).astype(np.uint8),
           "label": rng.integers(0, 10, (6,)).astype(np.int32)}
  variables = {"params": v["params"], "batch_stats": {}, "alive": alive,
               "mean": np.float32(0.5), "std": np.float32(0.3)}
  apply_fn = train.curvature_apply_fn(arch)
  # Compiled: eagerly, each of their ops would be compiled alone.
  h = jax.jit(functools.partial(curvature.ggn_fast, apply_fn))(sw, variables, batch)
  h_exact = jax.jit(functools.partial(curvature.ggn, apply_fn))(sw, variables, batch)
  for tau in sw:
    np.testing.assert_allclose(h[tau], h_exact[tau], rtol=1e-4, atol=1e-9)
    dead = ~alive[tau]
    np.testing.assert_array_equal(np.asarray(h[tau])[0][dead], 0.0)
    assert np.mean(np.asarray(h[tau])[0][~dead] > 0) > 0.5  # live ones see curvature
  prior = bayes.init(sw, alive={k: jnp.asarray(a) for k, a in alive.items()})
  new = bayes.update(prior, sw, h, lambda_origin=1e-3, lambda_op=1e-3, prune_threshold=0.0,
                     eps_omega=1e-8)
  for tau in sw:
    assert np.all(np.asarray(new.omega[tau])[~alive[tau]] == 1e-8)


# ------------------------------------------------------------------------------------------------
# The hierarchy (spec 3.3) through bayes.update.


def test_hierarchy_series_gamma_and_parent_child_deaths():
  arch = networks.lenet5(widths=(2, 3, 4))
  sw = groups.init_switches(arch)
  rng = np.random.default_rng(1)
  sw = {tau: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32) for tau, s in sw.items()}
  h = {tau: jnp.asarray(rng.uniform(0.1, 2.0, s.shape), jnp.float32) for tau, s in sw.items()}
  lam = 0.1
  prior = bayes.init(sw)
  new = bayes.update(prior, sw, h, lambda_origin=lam, lambda_op=lam, prune_threshold=0.0)
  s, hh = np.asarray(sw["conv2"][0], np.float64), np.asarray(h["conv2"][0], np.float64)
  big_h = hh / lam
  omega = np.sqrt(big_h / (1 + big_h))  # gamma_prev = 1
  raw = np.abs(s) / omega
  want_child = 1.0 / (1.0 / raw[:, 1:] + 1.0 / raw[:, :1])
  np.testing.assert_allclose(np.asarray(new.gamma["conv2"][0])[:, 1:], want_child, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new.gamma["conv2"][0])[:, 0], raw[:, 0], rtol=1e-5)
  # A dead channel kills its children; a channel whose children all died dies (R1).
  alive = {tau: np.ones(x.shape[1:], bool) for tau, x in sw.items()}
  alive["conv2"][0, 0] = False
  alive["conv2"][1, 1:] = False
  out = train.prior_step(prior._replace(alive={k: jnp.asarray(a) for k, a in alive.items()}),
                         sw, h, lam=lam, prune_threshold=0.0, eps_s=0.0)
  a = np.asarray(out.alive["conv2"])
  assert not a[0].any() and not a[1].any() and a[2].all()
  masks = groups.unit_masks(arch, out.alive)
  assert list(masks["conv2"]) == [False, False, True]
  assert masks["fc1_in"].reshape(16, 3)[:, :2].sum() == 0


def test_posterior_rule_prunes_switches_whose_posterior_includes_zero():
  # Reference written out per element: C = gamma_prev / (1 + gamma_prev h / lambda) with the
  # previous prior variance gamma_prev; a live group dies when s^2 < C; then the hierarchy.
  arch = networks.lenet5(widths=(2, 3, 4))
  sw = groups.init_switches(arch)
  rng = np.random.default_rng(3)
  sw = {tau: jnp.asarray(rng.uniform(0.2, 1.2, s.shape), jnp.float32) for tau, s in sw.items()}
  h = {tau: jnp.asarray(rng.uniform(0.0, 0.3, s.shape), jnp.float32) for tau, s in sw.items()}
  lam = 0.1
  prior = bayes.init(sw, gamma_init=2.0)
  out = train.prior_step(prior, sw, h, lam=lam, prune_threshold=0.0, eps_s=0.0,
                         prune_rule="posterior")
  same_gamma_rule = train.prior_step(prior, sw, h, lam=lam, prune_threshold=0.0, eps_s=0.0)
  for tau in sw:
    s = np.asarray(sw[tau][0], np.float64)
    hh = np.asarray(h[tau][0], np.float64)
    post = 2.0 / (1.0 + 2.0 * hh / lam)
    want = ~(s * s < post)
    if want.shape[1] > 1:  # parent without live children dies; dead parent kills children
      want[:, 0] &= want[:, 1:].any(axis=1)
      want[:, 1:] &= want[:, :1]
    np.testing.assert_array_equal(np.asarray(out.alive[tau]), want, err_msg=tau)
    assert np.asarray(same_gamma_rule.alive[tau]).all()  # gamma rule with threshold 0: none
    assert np.all(np.asarray(out.gamma[tau])[0][~want] == 0.0)
  assert any(not np.asarray(a).all() for a in out.alive.values())  # the case is not vacuous
  with pytest.raises(ValueError, match="prune_rule"):
    train.prior_step(prior, sw, h, lam=lam, prune_threshold=0.0, eps_s=0.0, prune_rule="cap")


def test_propagate_kills_channel_without_consumers_and_reports_collapse():
  arch = networks.lenet5(widths=(2, 3, 4))
  m = groups.full_masks(arch)
  m["fc1_in"] = m["fc1_in"].reshape(16, 3)
  m["fc1_in"][:, 1] = False
  m["fc1_in"] = m["fc1_in"].reshape(-1)
  out = groups.propagate(arch, m)
  assert list(out["conv2"]) == [True, False, True]
  m = groups.full_masks(arch)
  m["fc1"][:] = False
  with pytest.raises(groups.LayerCollapsedError, match="fc1"):
    groups.propagate(arch, m)


# ------------------------------------------------------------------------------------------------
# Export (spec 2.4).


@pytest.mark.parametrize("arch", [networks.lenet5(widths=(6, 8, 12)), networks.lenet300_100(),
                                  SMALL_VGG])
def test_export_equals_masked_network(arch, tmp_path):
  v = _random_variables(arch, seed=4)
  rng = np.random.default_rng(5)
  sw = {tau: jnp.asarray(rng.uniform(-1.5, 1.5, s.shape), jnp.float32)
        for tau, s in groups.init_switches(arch).items()}
  alive = {tau: rng.uniform(size=s.shape[1:]) > 0.4 for tau, s in sw.items()}
  for tau, a in alive.items():  # at least one unit per layer
    a[0, 0] = True
    if a.shape[1] > 1:
      a[0, 1] = True
  masks = groups.propagate(arch, groups.unit_masks(arch, alive))
  masked_sw = {tau: jnp.where(groups.group_alive(arch, masks)[tau], s, 0.0) for tau, s in sw.items()}
  x = jax.random.normal(jax.random.key(6), (5,) + arch.input_shape)
  want = _logits(arch, v, masked_sw, x)
  new_arch, new_v = export.export(arch, v, sw, masks)
  got = networks.CompressNet(new_arch).apply(new_v, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  kept = groups.kept_counts(arch, masks)
  assert [c.features for c in new_arch.convs] == [kept[f"conv{i}"] for i in
                                                    range(1, len(arch.convs) + 1)]
  assert networks.count_tree(new_v) == {k: networks.count(new_arch)[k] for k in ("weights", "params")}
  assert networks.count(new_arch)["weights"] < networks.count(arch)["weights"]
  export.save(str(tmp_path), new_arch, new_v, {"note": 1})
  arch2, v2 = export.load(str(tmp_path))
  assert arch2 == new_arch
  np.testing.assert_allclose(networks.CompressNet(arch2).apply(v2, x), got, rtol=0, atol=0)
