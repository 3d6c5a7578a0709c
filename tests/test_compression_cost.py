"""Cost-aware sparsity of network compression (``compress.cost_weighting``).

Oracles: group costs by hand from the layer sizes; the per-group strength ``lambda_g = lambda m_g``
written out per element (prior update, relative gamma threshold, posterior rule, hierarchy, and
the penalty with its gradient) independently of `bnas_jax.bayes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import bayes
from bnas_jax.compression import groups
from bnas_jax.compression import networks
from bnas_jax.compression import train


def test_group_costs_by_hand():
  lenet5 = networks.lenet5()  # 20 @ 24x24 (5x5x1), 50 @ 8x8 (5x5x20), 800 -> 500 -> 10
  macs = groups.group_costs(lenet5, "macs")
  # conv1 filter: own 25 x 576 + conv2's slice 25 x 50 x 64; conv2 channel: 25 x 20 x 64 (its 16
  # fc1 inputs are its children, 500 each); fc1 unit: 800 in + 10 out.
  np.testing.assert_array_equal(macs["conv1"], np.full((20, 1), 25 * 576 + 25 * 50 * 64))
  np.testing.assert_array_equal(macs["conv2"][:, 0], np.full(50, 25 * 20 * 64))
  np.testing.assert_array_equal(macs["conv2"][:, 1:], np.full((50, 16), 500))
  np.testing.assert_array_equal(macs["fc1"], np.full((500, 1), 810))
  w = groups.group_costs(lenet5, "weights")
  assert (w["conv1"][0, 0], w["conv2"][0, 0], w["conv2"][0, 1], w["fc1"][0, 0]) == (
      25 + 25 * 50, 25 * 20, 500, 810)
  mlp = groups.group_costs(networks.lenet300_100(), "macs")
  assert (mlp["fc1_in"][0, 0], mlp["fc1"][0, 0], mlp["fc2"][0, 0]) == (300, 784 + 100, 300 + 10)
  # VGG-like: a 1x1 flatten, so the last conv's channel is also the fc1 input (fc1 width 512).
  vgg = networks.vgg_like()
  last = f"conv{len(vgg.convs)}"
  h, wd, _ = vgg.conv_output_shapes()[-1]
  c_prev = vgg.convs[-2].features
  assert groups.group_costs(vgg, "macs")[last][0, 0] == 9 * c_prev * h * wd + 512
  m = groups.cost_weights(lenet5, "macs")
  np.testing.assert_allclose(np.mean(np.concatenate([v.ravel() for v in m.values()])), 1.0,
                             rtol=1e-6)
  assert groups.cost_weights(lenet5, "none") is None
  with pytest.raises(ValueError, match="cost_weighting"):
    groups.cost_weights(lenet5, "flops")


def _series(a, b):
  with np.errstate(divide="ignore"):
    return np.where((a > 0) & (b > 0), 1.0 / (1.0 / np.where(a > 0, a, 1) + 1.0 / np.where(
        b > 0, b, 1)), 0.0)


def _reference_prior_step(s, h, g_prev, alive_prev, lam_g, thr, eps_s):
  """One layer [E, K] (n = 1) with a per-group lambda, written out from the update's formulas."""
  a0 = alive_prev & (np.abs(s) >= eps_s)
  big_h = np.maximum(h, 0.0) / lam_g
  post = g_prev / (1.0 + g_prev * big_h)
  omega = np.maximum(np.sqrt(big_h / (1.0 + g_prev * big_h)), 1e-6)
  g_raw = np.abs(s) / omega
  g_origin = np.where(a0[:, 0], g_raw[:, 0], 0.0)
  g = np.concatenate([g_origin[:, None], _series(g_raw[:, 1:], g_origin[:, None])], axis=1)
  g = np.where(a0, g, 0.0)
  ref = np.full(g.shape, np.nan)
  ref[:, 0] = np.median(g[:, 0][a0[:, 0]])
  if g.shape[1] > 1:
    ref[:, 1:] = np.median(g[:, 1:][a0[:, 1:]])
  a = a0 & ~(g < thr * ref)

  def hierarchy(a):
    a = a.copy()
    if a.shape[1] > 1:
      a[:, 0] &= a[:, 1:].any(axis=1)
    a[:, 1:] &= a[:, :1]
    return a

  a = hierarchy(hierarchy(a) & ~(s * s < post))
  return {"alive": a, "gamma": np.where(a, g, 0.0), "omega": omega, "post": post, "H": big_h}


def test_cost_weighting_is_a_per_group_lambda_in_update_and_penalty():
  arch = networks.lenet5(widths=(3, 4, 5))
  rng = np.random.default_rng(0)
  sw = {tau: jnp.asarray(rng.uniform(0.05, 1.2, s.shape), jnp.float32)
        for tau, s in groups.init_switches(arch).items()}
  h = {tau: jnp.asarray(rng.uniform(-0.01, 0.3, s.shape), jnp.float32) for tau, s in sw.items()}
  g_prev = {tau: jnp.asarray(rng.uniform(0.2, 3.0, s.shape), jnp.float32) for tau, s in sw.items()}
  alive = {tau: jnp.asarray(rng.uniform(size=s.shape[1:]) > 0.15) for tau, s in sw.items()}
  cost = {tau: jnp.asarray(rng.uniform(0.1, 10.0, s.shape[1:]), jnp.float32)
          for tau, s in sw.items()}
  lam, thr, eps_s = 0.05, 0.3, 0.1
  prior = bayes.init(sw)._replace(gamma=g_prev, alive=alive)
  out = train.prior_step(prior, sw, h, lam=lam, prune_threshold=thr, eps_s=eps_s,
                         prune_rule="posterior", cost=cost)
  dead = 0
  for tau in sw:
    want = _reference_prior_step(
        np.asarray(sw[tau][0], np.float64), np.asarray(h[tau][0], np.float64),
        np.asarray(g_prev[tau][0], np.float64), np.asarray(alive[tau]),
        lam * np.asarray(cost[tau], np.float64), thr, eps_s)
    np.testing.assert_array_equal(np.asarray(out.alive[tau]), want["alive"], err_msg=tau)
    for got, key in ((out.gamma[tau][0], "gamma"), (out.omega[tau], "omega"),
                     (out.posterior_variance[tau][0], "post"), (out.curvature[tau][0], "H")):
      np.testing.assert_allclose(np.asarray(got), want[key], rtol=2e-5, atol=1e-7,
                                 err_msg=f"{tau} {key}")
    dead += int((np.asarray(alive[tau]) & ~want["alive"]).sum())
  assert dead > 0  # the case prunes something

  # Penalty: lambda sum_g lambda_g/lambda omega_g |s_g| and its gradient lambda m_g omega_g sign(s).
  for reweight in (True, False):
    omega = train.sparsity_penalty_omega(out, reweight, cost)

    def pen(s, omega=omega):
      return lam * bayes.penalty(s, omega, 1.0, 1.0, alive=out.alive)

    val, grad = jax.value_and_grad(pen)(sw)
    want_val = 0.0
    for tau, s in sw.items():
      w = np.asarray(out.omega[tau], np.float64) if reweight else 1.0
      per = lam * np.asarray(cost[tau], np.float64) * w * np.where(np.asarray(out.alive[tau]), 1, 0)
      want_val += np.sum(per * np.abs(np.asarray(s[0], np.float64)))
      np.testing.assert_allclose(np.asarray(grad[tau][0]), per * np.sign(np.asarray(s[0])),
                                 rtol=1e-5, atol=1e-9, err_msg=f"{tau} reweight={reweight}")
    np.testing.assert_allclose(float(val), want_val, rtol=1e-5)


def test_unit_cost_is_the_unweighted_step():
  arch = networks.lenet5(widths=(2, 3, 4))
  rng = np.random.default_rng(1)
  sw = {tau: jnp.asarray(rng.uniform(0.05, 1.2, s.shape), jnp.float32)
        for tau, s in groups.init_switches(arch).items()}
  h = {tau: jnp.asarray(rng.uniform(0.0, 0.3, s.shape), jnp.float32) for tau, s in sw.items()}
  ones = {tau: jnp.ones(s.shape[1:], jnp.float32) for tau, s in sw.items()}
  prior = bayes.init(sw, gamma_init=2.0)
  kw = dict(lam=0.1, prune_threshold=0.1, eps_s=0.1, prune_rule="posterior")
  a, b = train.prior_step(prior, sw, h, **kw), train.prior_step(prior, sw, h, cost=ones, **kw)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for reweight in (True, False):
    x, y = train.sparsity_penalty_omega(a, reweight), train.sparsity_penalty_omega(a, reweight, ones)
    for tau in x:
      np.testing.assert_array_equal(np.asarray(x[tau]), np.asarray(y[tau]))


def test_tiny_runs_with_mac_weighting_and_bad_value_is_named(shared_dir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from bnas_jax import config_files  # pylint: disable=g-import-not-at-top
  from bnas_jax import errors  # pylint: disable=g-import-not-at-top
  from bnas_jax.compression import runner  # pylint: disable=g-import-not-at-top
  exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "compress_lenet5.py")
  c = config_files.load(exp).get_config("tiny")
  c.data.data_dir = os.path.join(shared_dir, "data", "mnist-t10k")
  c.compress.cost_weighting = "flops"
  with pytest.raises(errors.ConfigError, match="cost_weighting"):
    runner.run(c, str(tmp_path / "bad"))
  for method in ("bayesnas", "group_lasso"):
    # MAC weights put 10-30x lambda on the conv filters: the tiny lambda / 10 (as benchmark (a)).
    c.method, c.compress.cost_weighting, c.compress.lam = method, "macs", 3e-4
    workdir = str(tmp_path / method)
    runner.run(c, workdir)
    with open(os.path.join(workdir, runner.RESULT_JSON)) as f:
      result = json.load(f)
    assert result["cost_weighting"] == "macs"
    assert 0 < result["macs_kept"] <= result["macs_dense"]
