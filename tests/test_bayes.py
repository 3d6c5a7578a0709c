"""Tests for bnas_jax.bayes (HARD prior): hand-derived scalar cases, stability, pruning, masking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnas_jax import bayes
from bnas_jax.search_space import spaces


def _sw(x, dtype=jnp.float32):
  return {"normal": jnp.asarray(x, dtype)}


# One jitted update shared by the tests (hyper-parameters traced, modes static): compiles once per
# shape/mode instead of op by op, and exercises the jit path everywhere.
_update_jit = jax.jit(bayes.update, static_argnames=("prune_mode", "fidelity"))


def _upd(state, s, h, **kw):
  kw = {"lambda_origin": 1.0, "lambda_op": 1.0, "prune_threshold": 0.0, **kw}
  return _update_jit(state, s, h, **kw)


def _with_gamma(state, gamma):
  return state._replace(gamma={k: jnp.asarray(v, jnp.float32) for k, v in gamma.items()})


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


# ------------------------------------------------------------------------------------------------
# init


def test_init_deterministic_defaults():
  s = {"normal": jnp.zeros((3, 4, 5)), "reduce": jnp.zeros((2, 4, 5))}
  st = bayes.init(s)
  for tau, x in s.items():
    np.testing.assert_array_equal(st.gamma[tau], np.ones(x.shape))
    np.testing.assert_array_equal(st.omega[tau], np.ones(x.shape[1:]))
    np.testing.assert_array_equal(st.posterior_variance[tau], st.gamma[tau])
    np.testing.assert_array_equal(st.curvature[tau], np.zeros(x.shape))
    assert st.alive[tau].dtype == jnp.bool_ and bool(jnp.all(st.alive[tau]))
  assert int(st.count) == 0


def test_init_random_matches_original_distribution():
  s = {"normal": jnp.zeros((6, 8, 8)), "reduce": jnp.zeros((2, 8, 8))}
  with pytest.raises(ValueError, match="PRNG key"):
    bayes.init(s, random_init=True)
  init = jax.jit(bayes.init, static_argnames=("random_init",))
  a = init(s, key=jax.random.key(0), random_init=True)
  b = init(s, key=jax.random.key(0), random_init=True)
  c = init(s, key=jax.random.key(1), random_init=True)
  for tau in s:
    g = np.asarray(a.gamma[tau])
    assert g.min() >= 0.0 and g.max() < 1.0
    assert len(np.unique(g)) == g.size  # independent per cell and switch
    assert a.omega[tau].shape == s[tau].shape[1:]
    np.testing.assert_array_equal(a.gamma[tau], b.gamma[tau])
    assert not np.array_equal(a.gamma[tau], c.gamma[tau])
  assert not np.array_equal(a.gamma["normal"][:2], a.gamma["reduce"])


def test_init_with_mask_zeroes_dead_gamma():
  alive = {"normal": np.array([[True, False, True]])}
  st = bayes.init(_sw(np.ones((2, 1, 3))), alive=alive)
  np.testing.assert_array_equal(st.gamma["normal"], [[[1, 0, 1]], [[1, 0, 1]]])
  np.testing.assert_array_equal(st.alive["normal"], alive["normal"])


# ------------------------------------------------------------------------------------------------
# update: hand-derived cases


def test_scalar_case():
  # n = 1, one origin switch: gamma = 1, h = 2, lambda = 1, s = 0.5.
  s, h = _sw([[[0.5]]]), _sw([[[2.0]]])
  st = _upd(bayes.init(s), s, h)
  np.testing.assert_allclose(st.curvature["normal"], [[[2.0]]], rtol=1e-6)
  np.testing.assert_allclose(st.posterior_variance["normal"], [[[1 / 3]]], rtol=1e-6)
  np.testing.assert_allclose(st.omega["normal"] ** 2, [[2 / 3]], rtol=1e-6)
  np.testing.assert_allclose(st.gamma["normal"], [[[0.5 / np.sqrt(2 / 3)]]], rtol=1e-6)
  assert int(st.count) == 1


def test_lambda_per_switch_kind():
  # origin: H = 1/1 = 1 -> omega^2 = 1/2; op: H = 1/0.5 = 2 -> omega^2 = 2/3 (gamma = 1).
  s, h = _sw([[[1.0, 1.0]]]), _sw([[[1.0, 1.0]]])
  st = _upd(bayes.init(s), s, h, lambda_origin=1.0, lambda_op=0.5)
  np.testing.assert_allclose(st.curvature["normal"], [[[1.0, 2.0]]], rtol=1e-6)
  np.testing.assert_allclose(st.omega["normal"] ** 2, [[0.5, 2 / 3]], rtol=1e-6)


def test_two_cell_group_per_cell_gamma_vs_fidelity_quirk():
  # gamma = (1, 3) per cell, H = (2, 1), S = (0.3, 0.4), ||S|| = 0.5.
  s, h = _sw([[[0.3]], [[0.4]]]), _sw([[[2.0]], [[1.0]]])
  st0 = _with_gamma(bayes.init(s), {"normal": [[[1.0]], [[3.0]]]})
  # Per-cell: 2/(1 + 2) + 1/(1 + 3) = 11/12.
  st = _upd(st0, s, h)
  np.testing.assert_allclose(st.omega["normal"] ** 2, [[11 / 12]], rtol=1e-6)
  np.testing.assert_allclose(st.posterior_variance["normal"], [[[1 / 3]], [[3 / 4]]], rtol=1e-6)
  np.testing.assert_allclose(st.gamma["normal"], np.full((2, 1, 1), 0.5 / np.sqrt(11 / 12)),
                             rtol=1e-6)
  # Original quirk, gamma* = 3 (last cell): |1/3 - (1/3)/9| + |1/3 - (3/4)/9| = 8/27 + 1/4 = 59/108.
  sf = _upd(st0, s, h, fidelity=True)
  np.testing.assert_allclose(sf.omega["normal"] ** 2, [[59 / 108]], rtol=1e-6)
  np.testing.assert_allclose(sf.gamma["normal"], np.full((2, 1, 1), 0.5 / np.sqrt(59 / 108)),
                             rtol=1e-6)
  # With equal per-cell gammas the quirk changes nothing.
  eq = _with_gamma(st0, {"normal": [[[2.0]], [[2.0]]]})
  np.testing.assert_allclose(_upd(eq, s, h, fidelity=True).omega["normal"],
                             _upd(eq, s, h).omega["normal"], rtol=1e-6)


def test_hierarchy_series_with_origin():
  # gamma = 1, H = 1 -> omega^2 = 1/2 for both; origin s = 1 -> gamma0 = sqrt(2);
  # op s = 2 -> raw = 2 sqrt(2); combined = (1/raw + 1/gamma0)^-1 = 2 sqrt(2) / 3.
  s, h = _sw([[[1.0, 2.0]]]), _sw([[[1.0, 1.0]]])
  st = _upd(bayes.init(s), s, h)
  g0, raw = np.sqrt(2.0), 2 * np.sqrt(2.0)
  np.testing.assert_allclose(st.gamma["normal"], [[[g0, 1 / (1 / raw + 1 / g0)]]], rtol=1e-6)
  np.testing.assert_allclose(st.gamma["normal"][0, 0, 1], 2 * np.sqrt(2) / 3, rtol=1e-6)


def test_series_variance_limits_and_values():
  inf = np.inf
  a = jnp.array([0.0, inf, 2.0, inf, 0.0, 3.0, 0.0])
  b = jnp.array([0.0, inf, inf, 2.0, 5.0, 0.0, inf])
  np.testing.assert_array_equal(bayes.series_variance(a, b), [0.0, inf, 2.0, 2.0, 0.0, 0.0, 0.0])
  rng = np.random.default_rng(0)
  x, y = rng.uniform(1e-3, 1e3, 100), rng.uniform(1e-3, 1e3, 100)
  np.testing.assert_allclose(bayes.series_variance(jnp.asarray(x), jnp.asarray(y)),
                             1 / (1 / x + 1 / y), rtol=1e-6)


def test_stable_omega_matches_naive_formula_in_float64():
  rng = np.random.default_rng(1)
  n, e, k = 4, 3, 5
  gamma = rng.uniform(0.1, 10.0, (n, e, k))
  h = rng.uniform(0.01, 10.0, (n, e, k))
  s = rng.normal(size=(n, e, k))
  lam = np.array([0.7] + [0.3] * (k - 1))
  with jax.enable_x64(True):
    st0 = bayes.init(_sw(s, jnp.float64))
    st0 = st0._replace(gamma=_sw(gamma, jnp.float64))
    st = jax.jit(bayes.update)(st0, _sw(s, jnp.float64), _sw(h, jnp.float64), lambda_origin=0.7,
                               lambda_op=0.3, prune_threshold=0.0)
    assert st.omega["normal"].dtype == jnp.float64
    got_w, got_c = np.asarray(st.omega["normal"]), np.asarray(st.posterior_variance["normal"])
  big_h = h / lam
  c_naive = 1.0 / (1.0 / gamma + big_h)
  w2_naive = np.sum(1.0 / gamma - c_naive / gamma**2, axis=0)
  np.testing.assert_allclose(got_c, c_naive, rtol=1e-12)
  np.testing.assert_allclose(got_w**2, w2_naive, rtol=1e-10)


def test_stable_omega_accurate_for_tiny_gamma_in_float32():
  # The naive 1/gamma - C/gamma^2 cancels catastrophically here; the stable form does not.
  gamma, hval = 1e-6, 3.0
  s = _sw([[[1.0]]])
  st = _upd(_with_gamma(bayes.init(s), {"normal": [[[gamma]]]}), s, _sw([[[hval]]]))
  np.testing.assert_allclose(st.omega["normal"] ** 2, [[hval / (1 + gamma * hval)]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# update: robustness


def test_no_nan_or_inf_in_degenerate_cases():
  # Cells x edges x switches with zero switches, zero / negative curvature and zero gamma mixed.
  s = np.array([[[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]],
                [[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
  h = np.array([[[0.0, -1.0, 0.0], [2.0, 0.0, -3.0]],
                [[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]]])
  gamma = np.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]],
                    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
  st0 = _with_gamma(bayes.init(_sw(s)), {"normal": gamma})
  for fidelity in (False, True):
    for thr in (0.0, 1e-3):
      st = _upd(st0, _sw(s), _sw(h), prune_threshold=thr, fidelity=fidelity)
      assert _all_finite(st), (fidelity, thr)
      assert bool(jnp.all(st.gamma["normal"] >= 0)) and bool(jnp.all(st.omega["normal"] > 0))
      assert _all_finite(jax.jit(bayes.summaries)(st))
  # Negative curvature is treated as zero curvature.
  st_neg = _upd(st0, _sw(s), _sw(h))
  st_clamped = _upd(st0, _sw(s), _sw(np.maximum(h, 0.0)))
  for a, b in zip(jax.tree.leaves(st_neg), jax.tree.leaves(st_clamped)):
    np.testing.assert_array_equal(a, b)


def test_zero_curvature_gives_eps_omega_and_finite_gamma():
  s, h = _sw([[[0.5, 0.25]]]), _sw([[[0.0, 0.0]]])
  st = _upd(bayes.init(s), s, h, eps_omega=1e-4)
  np.testing.assert_allclose(st.omega["normal"], [[1e-4, 1e-4]])
  g0 = 0.5 / 1e-4
  raw = 0.25 / 1e-4
  np.testing.assert_allclose(st.gamma["normal"], [[[g0, 1 / (1 / g0 + 1 / raw)]]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# pruning


def test_absolute_pruning_sets_gamma_exactly_zero():
  # One edge, origin + 2 ops, n = 2; H = 1 everywhere, gamma = 1 -> omega^2 = 2 * 1/2 = 1.
  s = np.array([[[1.0, 1.0, 1e-3]], [[1.0, 1.0, 0.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.ones_like(s)), prune_threshold=0.01)
  np.testing.assert_array_equal(st.alive["normal"], [[True, True, False]])
  np.testing.assert_array_equal(st.gamma["normal"][:, 0, 2], [0.0, 0.0])
  assert bool(jnp.all(st.gamma["normal"][:, 0, :2] > 0.01))


def test_dead_origin_kills_its_ops():
  # Edge 0: origin switch ~0 in every cell, large op switches -> the whole edge dies. Edge 1 lives.
  s = np.array([[[1e-4, 2.0, 3.0], [1.0, 1.0, 1.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.ones_like(s)), prune_threshold=0.01)
  np.testing.assert_array_equal(st.alive["normal"], [[False, False, False], [True, True, True]])
  np.testing.assert_array_equal(st.gamma["normal"][0, 0], [0.0, 0.0, 0.0])


def test_origin_without_live_ops_dies():
  s = np.array([[[1.0, 0.0, 1e-5], [1.0, 1.0, 0.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.ones_like(s)), prune_threshold=0.01)
  np.testing.assert_array_equal(st.alive["normal"], [[False, False, False], [True, True, False]])


def test_alive_only_shrinks_and_dead_stay_dead():
  rng = np.random.default_rng(2)
  alive0 = {"normal": np.array([[True, False, True, True], [False, True, True, True],
                                [True, True, True, True]])}
  s_shape = (3, 3, 4)
  st = bayes.init(_sw(np.zeros(s_shape)), alive=alive0)
  update = jax.jit(functools.partial(bayes.update, lambda_origin=0.5, lambda_op=0.5,
                                     prune_threshold=0.3))
  prev = np.asarray(st.alive["normal"])
  for t in range(4):
    # Large switches and curvature on dead groups must not revive them.
    s = _sw(rng.uniform(0.0, 2.0, s_shape))
    h = _sw(rng.uniform(0.0, 2.0, s_shape))
    st = update(st, s, h)
    cur = np.asarray(st.alive["normal"])
    assert not np.any(cur & ~prev), t
    np.testing.assert_array_equal(np.asarray(st.gamma["normal"])[:, ~cur], 0.0)
    assert not cur[1].any()  # dead origin of edge 1 killed its ops on the first update
    prev = cur
  assert int(st.count) == 4


def test_relative_pruning():
  # n = 1, H = 0 -> omega = eps_omega for all; gamma_raw = |s| / eps. Origins 4 and 1 (edges 0, 1).
  # Ops (series with their origin): edge 0: raw 4 -> 2, raw 0.5 -> 4*0.5/4.5 = 0.444; edge 1: raw 1
  # with origin 1 -> 0.5 and 0.5. The threshold is relative per switch kind, to its median live
  # gamma: origins against median(4, 1) = 2.5, ops against median(2, 0.444, 0.5, 0.5) = 0.5.
  s = np.array([[[4.0, 4.0, 0.5], [1.0, 1.0, 1.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.zeros_like(s)), eps_omega=1.0,
            prune_threshold=1.0, prune_mode="relative")
  # Origin threshold 2.5: edge 1's origin (1.0) dies and takes its ops along. Op threshold 0.5:
  # edge 0 keeps op 1 (2.0) and loses op 2 (0.444).
  np.testing.assert_array_equal(st.alive["normal"], [[True, True, False], [False, False, False]])
  # At 0.3 (origin threshold 0.75, op threshold 0.15) everything survives.
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.zeros_like(s)), eps_omega=1.0,
            prune_threshold=0.3, prune_mode="relative")
  np.testing.assert_array_equal(st.alive["normal"], np.ones((2, 3), bool))


def test_relative_pruning_survives_one_outlying_group():
  # A bayesnas-shaped cell where one origin has zero curvature (a scale-invariant branch): its
  # omega sits at the floor and its gamma is ~1e5 times the others'. Against the maximum it would
  # set a threshold that prunes every other edge of the cell; against the median nothing else dies.
  rng = np.random.default_rng(0)
  n, e, k = 6, 8, 8
  s = rng.uniform(0.5, 1.5, (n, e, k))
  h = rng.uniform(0.5, 1.5, (n, e, k))
  h[:, 3, 0] = 0.0
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(h), lambda_origin=0.01, lambda_op=0.01,
            prune_threshold=1e-3, prune_mode="relative")
  g = np.asarray(bayes.group_gamma(st)["normal"])
  assert g[3, 0] > 1e4 * np.median(g[:, 0])  # the outlier is there
  assert np.asarray(st.alive["normal"]).all()  # and prunes nothing
  # The same case under the old rule (threshold relative to the largest gamma) wiped the cell.
  assert (g[:, 0] < 1e-3 * g[:, 0].max()).sum() == e - 1


def test_score_keeps_the_gamma_before_pruning():
  s = np.array([[[4.0, 4.0, 0.5], [1.0, 1.0, 1.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.zeros_like(s)), eps_omega=1.0,
            prune_threshold=1.0, prune_mode="relative")
  score, alive = np.asarray(st.score["normal"]), np.asarray(st.alive["normal"])
  np.testing.assert_allclose(score, [[4.0, 2.0, 4 * 0.5 / 4.5], [1.0, 0.5, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(score[alive], np.asarray(bayes.group_gamma(st)["normal"])[alive])
  # Dead groups keep the score they died with; live ones follow their gamma.
  st2 = _upd(st, _sw(2 * s), _sw(np.zeros_like(s)), eps_omega=1.0, prune_threshold=0.0)
  np.testing.assert_allclose(np.asarray(st2.score["normal"])[~alive], score[~alive])
  np.testing.assert_allclose(np.asarray(st2.score["normal"])[alive], 2 * score[alive], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# penalty and proximal step


def _np_group_norm(s):
  return np.sqrt(np.sum(np.asarray(s, np.float64) ** 2, axis=0))


def test_penalty_value_closed_form_and_dead_groups():
  rng = np.random.default_rng(3)
  s = {"normal": rng.normal(size=(3, 2, 4)), "reduce": rng.normal(size=(2, 2, 4))}
  omega = {t: rng.uniform(0.5, 2.0, (2, 4)) for t in s}
  alive = {"normal": np.array([[True, True, False, True], [True, True, True, True]]),
           "reduce": np.ones((2, 4), bool)}
  lam = np.array([0.3, 0.1, 0.1, 0.1])
  want_all = sum(np.sum(lam * omega[t] * _np_group_norm(s[t])) for t in s)
  want_alive = sum(np.sum((lam * omega[t] * _np_group_norm(s[t]))[alive[t]]) for t in s)
  sj = {t: jnp.asarray(v, jnp.float32) for t, v in s.items()}
  oj = {t: jnp.asarray(v, jnp.float32) for t, v in omega.items()}
  np.testing.assert_allclose(bayes.penalty(sj, oj, 0.3, 0.1), want_all, rtol=1e-5)
  np.testing.assert_allclose(bayes.penalty(sj, oj, 0.3, 0.1, alive=alive), want_alive, rtol=1e-5)
  st = bayes.init(sj)._replace(omega=oj, alive={t: jnp.asarray(a) for t, a in alive.items()})
  np.testing.assert_allclose(bayes.penalty(sj, st, 0.3, 0.1), want_alive, rtol=1e-5)
  zeros = {t: jnp.zeros_like(v) for t, v in sj.items()}
  assert float(bayes.penalty(zeros, st, 0.3, 0.1)) == 0.0


def test_penalty_gradient_analytic_and_finite_differences():
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    s = rng.normal(size=(3, 2, 3))
    s[:, 1, 2] = 0.0  # one group exactly at zero
    omega = rng.uniform(0.5, 2.0, (2, 3))
    alive = np.array([[True, False, True], [True, True, True]])
    lam = np.array([0.3, 0.2, 0.2])
    fn = jax.jit(lambda x: bayes.penalty({"normal": x}, {"normal": jnp.asarray(omega)}, 0.3, 0.2,
                                         alive={"normal": alive}))
    x = jnp.asarray(s)
    grad = np.asarray(jax.grad(fn)(x))
    assert np.all(np.isfinite(grad))
    norm = _np_group_norm(s)
    safe = np.where(norm > 0, norm, 1.0)
    analytic = np.where(alive & (norm > 0), lam * omega / safe, 0.0)[None] * s
    np.testing.assert_allclose(grad, analytic, rtol=1e-8, atol=1e-12)
    # Central finite differences on entries of live, non-zero groups.
    step = 1e-6
    for idx in [(0, 0, 0), (2, 0, 2), (1, 1, 0), (0, 1, 1)]:
      e = np.zeros_like(s)
      e[idx] = step
      fd = (float(fn(x + e)) - float(fn(x - e))) / (2 * step)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-6, atol=1e-9)
    # At S = 0 the gradient is finite (zero).
    g0 = jax.grad(fn)(jnp.zeros_like(x))
    np.testing.assert_array_equal(np.asarray(g0), 0.0)
  # float32, all zero: still finite.
  g32 = jax.grad(lambda x: bayes.penalty({"normal": x}, {"normal": jnp.ones((2, 3))}, 1.0, 1.0))(
      jnp.zeros((3, 2, 3)))
  assert bool(jnp.all(jnp.isfinite(g32))) and float(jnp.max(jnp.abs(g32))) == 0.0


def test_prox_group_l1_is_group_soft_threshold():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    s = rng.normal(size=(2, 3, 3))
    s[:, 2, 1] = 0.0
    s[:, 0, 2] *= 1e-3  # below the threshold -> exactly zero
    omega = rng.uniform(0.5, 1.5, (3, 3))
    alive = np.array([[True, True, True], [True, False, True], [True, True, True]])
    lam = np.array([0.4, 0.25, 0.25])
    step = 0.5
    out = np.asarray(bayes.prox_group_l1({"normal": jnp.asarray(s)}, {"normal": jnp.asarray(omega)},
                                         0.4, 0.25, step, alive={"normal": alive})["normal"])
    thr = step * lam * omega
    norm = _np_group_norm(s)
    want = np.where(norm > thr, 1 - thr / np.where(norm > 0, norm, 1), 0.0)[None] * s
    want[:, ~alive] = 0.0
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=0)
    assert np.all(out[:, 0, 2] == 0.0) and np.all(out[:, 2, 1] == 0.0) and np.all(out[:, 1, 1] == 0)
    # Optimality: out minimises 0.5 ||x - s||^2 + step * penalty(x) (perturbations never help).
    objective = lambda x: (0.5 * np.sum((x - s)[:, alive] ** 2) + step * float(bayes.penalty(
        {"normal": jnp.asarray(x)}, {"normal": jnp.asarray(omega)}, 0.4, 0.25,
        alive={"normal": alive}, eps=1e-30)))
    base = objective(out)
    for _ in range(20):
      assert objective(out + 1e-3 * rng.normal(size=s.shape)) >= base - 1e-12


# ------------------------------------------------------------------------------------------------
# masking through optax


def _masked_sgd_run(tx, alive, switches, target, omega, steps=6, pass_alive=True, prox=False):
  def data_loss(x):
    return 0.5 * sum(jnp.sum((x[t] - target[t]) ** 2) for t in x)

  def loss(x):
    return data_loss(x) if prox else data_loss(x) + bayes.penalty(x, omega, 0.05, 0.02, alive=alive)

  @jax.jit
  def step(x, opt_state, alive):
    grads = jax.grad(loss)(x)
    extra = {"alive": alive} if pass_alive else {}
    upd, opt_state = tx.update(grads, opt_state, x, **extra)
    x = optax.apply_updates(x, upd)
    if prox:
      x = bayes.prox_group_l1(x, omega, 0.05, 0.02, 0.1, alive=alive)
    return x, opt_state

  x = bayes.apply_mask(switches, alive)
  opt_state = tx.init(x)
  for _ in range(steps):
    x, opt_state = step(x, opt_state, alive)
  return x


def test_pruned_switches_stay_exactly_zero_through_sgd_momentum():
  rng = np.random.default_rng(6)
  shapes = {"normal": (3, 2, 4), "reduce": (2, 2, 4)}
  switches = {t: jnp.asarray(rng.normal(size=sh), jnp.float32) for t, sh in shapes.items()}
  target = {t: jnp.asarray(rng.normal(size=sh) + 2.0, jnp.float32) for t, sh in shapes.items()}
  omega = {t: jnp.ones(sh[1:]) for t, sh in shapes.items()}
  alive = {"normal": jnp.array([[True, False, True, True], [False, False, False, False]]),
           "reduce": jnp.array([[True, True, True, False], [True, True, True, True]])}
  # The data-loss gradient is nonzero at dead entries, so the momentum buffers fill up there; only
  # the final masking transformation keeps the pruned switches at exactly 0.
  sgd = optax.sgd(0.1, momentum=0.9)
  runs = {
      "dynamic": _masked_sgd_run(optax.chain(sgd, bayes.mask_updates()), alive, switches, target,
                                 omega),
      "fixed": _masked_sgd_run(optax.chain(sgd, bayes.mask_updates(alive)), alive, switches, target,
                               omega, pass_alive=False),
      "proximal": _masked_sgd_run(optax.chain(sgd, bayes.mask_updates()), alive, switches, target,
                                  omega, prox=True),
  }
  for name, x in runs.items():
    for t in shapes:
      dead = ~np.asarray(alive[t])
      assert np.all(np.asarray(x[t])[:, dead] == 0.0), (name, t)
      live = np.asarray(x[t])[:, ~dead]
      assert not np.allclose(live, np.asarray(switches[t])[:, ~dead]), (name, t)  # it did train
  # Control: without the mask the data loss revives the pruned switches.
  x = _masked_sgd_run(sgd, alive, switches, target, omega, pass_alive=False)
  assert np.any(np.asarray(x["normal"])[:, ~np.asarray(alive["normal"])] != 0.0)


def test_mask_updates_without_mask_raises():
  tx = bayes.mask_updates()
  g = _sw(np.ones((1, 1, 2)))
  with pytest.raises(ValueError, match="alive="):
    tx.update(g, tx.init(g), g)


def test_apply_mask_exact_zeros():
  s = {"normal": jnp.arange(1.0, 13.0).reshape(2, 2, 3)}
  alive = {"normal": np.array([[True, False, True], [False, True, True]])}
  out = np.asarray(bayes.apply_mask(s, alive)["normal"])
  np.testing.assert_array_equal(out[:, ~alive["normal"]], 0.0)
  live = alive["normal"]
  np.testing.assert_array_equal(out[:, live], np.asarray(s["normal"])[:, live])


# ------------------------------------------------------------------------------------------------
# summaries, jit, shapes of the real space, errors


def test_summaries_values_and_counts():
  s = np.array([[[1.0, 1.0, 1e-4], [1.0, 2.0, 3.0]], [[1.0, 1.0, 0.0], [1.0, 2.0, 3.0]]])
  st = _upd(bayes.init(_sw(s)), _sw(s), _sw(np.ones_like(s)), prune_threshold=0.01)
  out = jax.jit(bayes.summaries)(st)
  alive = np.asarray(st.alive["normal"])
  np.testing.assert_array_equal(alive, [[True, True, False], [True, True, True]])
  assert int(out["normal/live_groups"]) == 5 and int(out["live_groups"]) == 5
  assert int(out["normal/live_switches"]) == 10
  assert int(out["normal/live_edges"]) == 2 and int(out["normal/live_ops"]) == 3
  g = np.asarray(st.gamma["normal"])[:, alive]
  np.testing.assert_allclose(out["normal/gamma_min"], g.min(), rtol=1e-6)
  np.testing.assert_allclose(out["normal/gamma_median"], np.median(g), rtol=1e-6)
  np.testing.assert_allclose(out["normal/gamma_max"], g.max(), rtol=1e-6)
  w = np.asarray(st.omega["normal"])[alive]
  np.testing.assert_allclose(out["normal/omega_median"], np.median(w), rtol=1e-6)
  for f in ("C", "H"):
    for stat in ("min", "median", "max"):
      assert f"normal/{f}_{stat}" in out
  assert int(out["count"]) == 1


def _np_reference_update(gamma, s, h, alive, lam, thr, relative, eps_omega=bayes.EPS_OMEGA):
  """Plain float64 numpy transcription of spec 4.2 with the naive formulas (well conditioned)."""
  big_h = np.maximum(h, 0.0) / lam
  c = 1.0 / (1.0 / gamma + big_h)
  omega = np.maximum(np.sqrt(np.sum(1.0 / gamma - c / gamma**2, axis=0)), eps_omega)
  raw = np.sqrt(np.sum(s**2, axis=0)) / omega
  g = np.zeros_like(raw)
  g[:, 0] = np.where(alive[:, 0], raw[:, 0], 0.0)
  with np.errstate(divide="ignore"):
    g[:, 1:] = np.where(g[:, :1] > 0, 1.0 / (1.0 / raw[:, 1:] + 1.0 / g[:, :1]), 0.0)
  g = np.where(alive, g, 0.0)
  if relative:  # per switch kind: against the median live origin / the median live op gamma
    med = lambda x, m: np.median(x[m])
    cut = thr * np.concatenate([[med(g[:, 0], alive[:, 0])],
                                np.full(g.shape[1] - 1, med(g[:, 1:], alive[:, 1:]))])
  else:
    cut = thr
  a = alive & ~(g < cut)
  a[:, 0] &= a[:, 1:].any(axis=1)
  a[:, 1:] &= a[:, :1]
  return np.where(a, g, 0.0), omega, c, big_h, a


def test_update_matches_numpy_reference_on_bayesnas_shapes():
  space = spaces.get_space("bayesnas")
  shapes = space.switch_shapes({"normal": 6, "reduce": 2})
  rng = np.random.default_rng(7)
  s = {t: rng.normal(size=sh) for t, sh in shapes.items()}
  h = {t: rng.uniform(-0.1, 1.0, sh) for t, sh in shapes.items()}
  st0 = bayes.init({t: jnp.asarray(v, jnp.float32) for t, v in s.items()},
                   key=jax.random.key(7), random_init=True)
  gamma0 = {t: np.maximum(np.asarray(st0.gamma[t], np.float64), 1e-3) for t in shapes}
  alive0 = {t: rng.uniform(size=sh[1:]) > 0.1 for t, sh in shapes.items()}
  st0 = st0._replace(gamma={t: jnp.asarray(np.where(alive0[t], gamma0[t], 0.0), jnp.float32)
                            for t in shapes},
                     alive={t: jnp.asarray(a) for t, a in alive0.items()})
  lam = np.array([0.01] + [0.007] * len(space.ops))
  f32 = lambda tree: {t: jnp.asarray(v, jnp.float32) for t, v in tree.items()}
  for mode, thr in (("absolute", 0.2), ("relative", 0.5)):
    got = _upd(st0, f32(s), f32(h), lambda_origin=0.01, lambda_op=0.007, prune_threshold=thr,
               prune_mode=mode)
    assert _all_finite(got)
    for t, sh in shapes.items():
      g, w, c, big_h, a = _np_reference_update(gamma0[t], s[t], h[t], alive0[t], lam, thr,
                                               mode == "relative")
      np.testing.assert_array_equal(got.alive[t], a)
      assert 0 < a.sum() < a.size, (mode, t)  # the case prunes something but not everything
      np.testing.assert_allclose(got.gamma[t], np.broadcast_to(g, sh), rtol=1e-5)
      # Groups dead before the update have gamma = 0 (the reference used gamma0 there).
      np.testing.assert_allclose(np.asarray(got.omega[t])[alive0[t]], w[alive0[t]], rtol=1e-5)
      live = np.broadcast_to(alive0[t], sh)
      np.testing.assert_allclose(np.asarray(got.posterior_variance[t])[live], c[live], rtol=1e-5)
      np.testing.assert_allclose(got.curvature[t], big_h, rtol=1e-5)
      np.testing.assert_allclose(bayes.group_gamma(got)[t], g, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lambda_origin=0.0), "lambda_origin"),
    (dict(lambda_op=-1.0), "lambda_op"),
    (dict(prune_mode="percent"), "prune_mode"),
    (dict(prune_threshold=-0.1), "prune_threshold"),
])
def test_update_rejects_bad_hyperparameters(kwargs, match):
  s = _sw(np.ones((1, 1, 2)))
  kwargs = {"lambda_origin": 1.0, "lambda_op": 1.0, "prune_threshold": 0.0, **kwargs}
  with pytest.raises(ValueError, match=match):
    bayes.update(bayes.init(s), s, s, **kwargs)


def test_shape_errors_name_the_input():
  s = _sw(np.ones((2, 1, 3)))
  st = bayes.init(s)
  with pytest.raises(ValueError, match="h\\['normal'\\]"):
    _upd(st, s, _sw(np.ones((1, 1, 3))))
  with pytest.raises(ValueError, match="cell types"):
    _upd(st, s, {"reduce": jnp.ones((2, 1, 3))})
  with pytest.raises(ValueError, match="n_cells, E, 1 \\+ n_ops"):
    bayes.init({"normal": jnp.ones((1, 3))})
  with pytest.raises(ValueError, match="alive"):
    bayes.apply_mask(s, {"normal": np.ones((2, 3), bool)})


# ------------------------------------------------------------------------------------------------
# Connectivity (update(..., cells=...)): the alive mask agrees with genotype.derive.


def _update_cells_jit(space_name):
  space = spaces.get_space(space_name)
  return jax.jit(functools.partial(bayes.update, lambda_origin=1.0, lambda_op=1.0,
                                   prune_threshold=0.01, cells=space.cells))


def test_dead_source_node_kills_downstream_edges_bayesnas():
  space = spaces.get_space("bayesnas")
  e, k = space.group_shape("normal")
  s = np.ones((2, e, k), np.float32)
  s[:, 0, 0] = s[:, 1, 0] = 1e-5  # both edges into node 2 (n0) die by their origin switch
  sw = {t: jnp.asarray(s) for t in space.cells}
  h = {t: jnp.ones_like(v) for t, v in sw.items()}
  sel_0_3 = [i for i, ed in enumerate(space.cells["normal"].edges) if ed.name == "sel_0_3"][0]
  without = _upd(bayes.init(sw), sw, h, prune_threshold=0.01)
  assert bool(without.alive["normal"][sel_0_3].all())  # origin -> op hierarchy alone keeps it
  st = _update_cells_jit("bayesnas")(bayes.init(sw), sw, h)
  np.testing.assert_array_equal(st.alive["normal"][sel_0_3], False)
  np.testing.assert_array_equal(st.gamma["normal"][:, sel_0_3], 0.0)
  # Every other edge of the normal cell leaves an input node and survives.
  others = [i for i in range(e) if i not in (0, 1, sel_0_3)]
  assert bool(np.asarray(st.alive["normal"])[others].all())


def test_edges_that_cannot_reach_the_output_die_nb201():
  space = spaces.get_space("nb201")
  edges = space.cells["normal"].edges
  idx = {(ed.source, ed.target): i for i, ed in enumerate(edges)}
  s = np.ones((1, *space.group_shape("normal")), np.float32)
  s[:, idx[(2, 3)], 0] = 1e-5  # node 2 no longer feeds the output node 3
  sw = {"normal": jnp.asarray(s)}
  st = _update_cells_jit("nb201")(bayes.init(sw), sw, {"normal": jnp.ones_like(sw["normal"])})
  alive = np.asarray(st.alive["normal"])
  for pair in [(0, 2), (1, 2), (2, 3)]:
    assert not alive[idx[pair]].any(), pair
  for pair in [(0, 1), (0, 3), (1, 3)]:
    assert alive[idx[pair]].all(), pair


@pytest.mark.parametrize("space_name", ["bayesnas", "darts", "nb201"])
def test_alive_mask_after_update_matches_derive_on_random_masks(space_name):
  from bnas_jax import genotype  # pylint: disable=import-outside-toplevel
  space = spaces.get_space(space_name)
  upd = _update_cells_jit(space_name)
  rng = np.random.default_rng(0)
  for trial in range(25):
    p_alive = [0.3, 0.5, 0.8][trial % 3]
    alive0 = {t: rng.random(space.group_shape(t)) < p_alive for t in space.cells}
    sw = {t: jnp.ones((2, *space.group_shape(t)), jnp.float32) for t in space.cells}
    st = bayes.init(sw, alive=alive0)
    st = upd(st, sw, {t: jnp.ones_like(v) for t, v in sw.items()})
    want = genotype.derive(space, alive0)
    for t, topo in space.cells.items():
      a = np.asarray(st.alive[t])
      got = {(topo.edges[e].target, topo.edges[e].source, space.ops[i])
             for e, i in zip(*np.nonzero(a[:, 1:] & a[:, :1]))}
      assert got == set(want.cell(t)), (trial, t)
      # No orphan origin switches: a live origin has a live op and vice versa.
      np.testing.assert_array_equal(a[:, 0], a[:, 1:].any(axis=1))


def test_update_rejects_cells_of_another_space():
  s = _sw(np.ones((1, 3, 5)))
  with pytest.raises(ValueError, match="edges"):
    bayes.update(bayes.init(s), s, s, lambda_origin=1.0, lambda_op=1.0, prune_threshold=0.0,
                 cells=spaces.get_space("bayesnas").cells)


def test_calibration_quantiles_of_gamma_times_h():
  rng = np.random.default_rng(4)
  s = rng.uniform(0.5, 1.5, (3, 4, 5))
  gamma_prev = rng.uniform(0.1, 2.0, (3, 4, 5))
  gamma_prev[:, 1, :] = 0.0  # a dead edge: left out of the statistics
  h = rng.uniform(0.0, 3.0, (3, 4, 5))
  alive = np.ones((4, 5), bool)
  alive[1] = False
  st0 = _with_gamma(bayes.init(_sw(s), alive={"normal": alive}), {"normal": gamma_prev})
  st = _upd(st0, _sw(s), _sw(h), lambda_origin=0.5, lambda_op=0.25)
  got = {k: float(v) for k, v in bayes.calibration({"normal": gamma_prev}, st).items()}
  for kind, sl, lam in (("origin", slice(0, 1), 0.5), ("op", slice(1, None), 0.25)):
    g, big_h = gamma_prev[..., sl], h[..., sl] / lam
    live = g > 0
    x = (g * big_h)[live]
    for q in (10, 50, 90):
      np.testing.assert_allclose(got[f"normal/{kind}/gammaH_q{q}"], np.quantile(x, q / 100),
                                 rtol=1e-5)
    np.testing.assert_allclose(got[f"normal/{kind}/H_median"], np.median(big_h[live]), rtol=1e-5)
    np.testing.assert_allclose(got[f"normal/{kind}/inv_gamma_median"], np.median(1 / g[live]),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The optax-style factory.


def test_hard_prior_factory_matches_numpy_reference_and_masks_switches():
  """hard_prior(...).update(h, state, switches) against the float64 reference per element, and
  its switches are apply_mask's (pruned groups exactly 0, live ones unchanged)."""
  space = spaces.get_space("bayesnas")
  shapes = space.switch_shapes({"normal": 4, "reduce": 2})
  rng = np.random.default_rng(11)
  s = {t: jnp.asarray(rng.normal(size=sh), jnp.float32) for t, sh in shapes.items()}
  h = {t: jnp.asarray(rng.uniform(0.0, 1.0, sh), jnp.float32) for t, sh in shapes.items()}
  prior = bayes.hard_prior(lambda_origin=0.01, lambda_op=0.007, prune_threshold=0.5,
                           prune_mode="relative", gamma_init=0.3, omega_init=2.0)
  state = jax.jit(prior.init)(s)
  for t, sh in shapes.items():
    np.testing.assert_array_equal(state.gamma[t], np.full(sh, 0.3, np.float32))
    np.testing.assert_array_equal(state.omega[t], np.full(sh[1:], 2.0, np.float32))
  new_s, new_state = jax.jit(prior.update)(h, state, s)
  lam = np.array([0.01] + [0.007] * len(space.ops))
  for t, sh in shapes.items():
    g, w, _, _, a = _np_reference_update(np.full(sh, 0.3), np.asarray(s[t], np.float64),
                                         np.asarray(h[t], np.float64), np.ones(sh[1:], bool),
                                         lam, 0.5, True)
    np.testing.assert_array_equal(new_state.alive[t], a)
    assert 0 < a.sum() < a.size
    np.testing.assert_allclose(new_state.gamma[t], np.broadcast_to(g, sh), rtol=1e-5)
    np.testing.assert_allclose(new_state.omega[t], w, rtol=1e-5)
    np.testing.assert_array_equal(new_s[t], np.where(a[None], np.asarray(s[t]), 0.0))
  assert int(new_state.count) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(lambda_origin=0.0), "lambda_origin"),
    (dict(lambda_op=-1.0), "lambda_op"),
    (dict(prune_mode="percent"), "prune_mode"),
    (dict(prune_threshold=-0.1), "prune_threshold"),
    (dict(gamma_init=0.0), "gamma_init"),
    (dict(eps_omega=0.0), "eps_omega"),
])
def test_hard_prior_factory_rejects_bad_settings_when_built(kwargs, match):
  kwargs = {"lambda_origin": 1.0, "lambda_op": 1.0, "prune_threshold": 0.0, **kwargs}
  with pytest.raises(ValueError, match=match):
    bayes.hard_prior(**kwargs)
