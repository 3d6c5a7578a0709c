"""Numerical checks of bnas_jax.curvature against independent references.

References: jax.hessian of the flat loss, an explicitly built J^T H J from jax.jacrev, central finite
differences, closed forms (linear model + squared error), the statistical error of Monte-Carlo
estimators, and the batch-size convention of `accumulate`. Everything runs in float64 (the module
switches x64 on and restores the previous setting afterwards).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import curvature

import helpers

B, D, H1, H2, C = 5, 6, 4, 3, 4


@pytest.fixture(scope="module", autouse=True)
def x64():
  old = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


# --------------------------------------------------------------------------------------------------
# Tiny test models. Both accept switches with an optional leading per-example axis.
# --------------------------------------------------------------------------------------------------

def mlp_apply(variables, switches, images):
  """MLP whose hidden units are scaled by switches: {'a': [H1], 'b': [2, H2]} (+ leading B axis)."""
  p = variables["params"]
  h1 = jnp.tanh(images @ p["w1"] + p["b1"]) * switches["a"]
  sb = switches["b"]
  h2 = sb[..., 0, :] * jnp.tanh(h1 @ p["w2"]) + sb[..., 1, :] * jnp.sin(h1 @ p["w3"])
  return h2 @ p["w4"] + p["b4"]


def mlp_init(key):
  ks = jax.random.split(key, 8)
  params = {"w1": jax.random.normal(ks[0], (D, H1)), "b1": 0.1 * jax.random.normal(ks[1], (H1,)),
            "w2": jax.random.normal(ks[2], (H1, H2)), "w3": jax.random.normal(ks[3], (H1, H2)),
            "w4": jax.random.normal(ks[4], (H2, C)), "b4": 0.1 * jax.random.normal(ks[5], (C,))}
  switches = {"a": jax.random.uniform(ks[6], (H1,), minval=0.5, maxval=1.5),
              "b": jax.random.uniform(ks[7], (2, H2), minval=0.5, maxval=1.5)}
  return {"params": params}, switches


def _scale(x, s):
  """x f32[B, ...] times a switch scalar s (f32[] or per-example f32[B])."""
  return x * (s if jnp.ndim(s) == 0 else s.reshape((-1,) + (1,) * (x.ndim - 1)))


class ConvNet(nn.Module):
  """conv -> (BN) -> 2 switched edges of 3 ops each -> pool -> dense. Switches {'ops': [2, 3]}."""
  use_bn: bool = True

  @nn.compact
  def __call__(self, images, switches, train=True):
    s = switches["ops"]
    x = nn.Conv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)(images)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, dtype=jnp.float64,
                       param_dtype=jnp.float64)(x)
    for e in range(2):
      conv = nn.Conv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)(nn.relu(x))
      if self.use_bn:
        conv = nn.BatchNorm(use_running_average=not train, dtype=jnp.float64,
                            param_dtype=jnp.float64)(conv)
      pool = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME")
      x = (_scale(jnp.tanh(conv), s[..., e, 0]) + _scale(pool, s[..., e, 1])
           + _scale(x, s[..., e, 2]))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(C, dtype=jnp.float64, param_dtype=jnp.float64)(x)


def conv_apply_fn(model):
  def apply(variables, switches, images):
    if "batch_stats" in variables:
      logits, _ = model.apply(variables, images, switches, train=True, mutable=["batch_stats"])
      return logits
    return model.apply(variables, images, switches, train=True)
  return apply


@pytest.fixture(scope="module")
def mlp(x64):
  variables, switches = mlp_init(jax.random.PRNGKey(0))
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"image": jax.random.normal(kx, (B, D)), "label": jax.random.randint(ky, (B,), 0, C)}
  return mlp_apply, switches, variables, batch


def _conv_problem(use_bn):
  model = ConvNet(use_bn=use_bn)
  kx, ky, ki, ks = jax.random.split(jax.random.PRNGKey(2), 4)
  images = jax.random.normal(kx, (4, 5, 5, 2), dtype=jnp.float64)
  switches = {"ops": jax.random.uniform(ks, (2, 3), jnp.float64, 0.5, 1.5)}
  variables = helpers.jit_init(model, ki, images, switches, train=True)
  batch = {"image": images, "label": jax.random.randint(ky, (4,), 0, C)}
  return conv_apply_fn(model), switches, dict(variables), batch


@pytest.fixture(scope="module")
def convbn(x64):
  return _conv_problem(use_bn=True)


# --------------------------------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------------------------------

def flat_loss(problem, loss="softmax_cross_entropy"):
  apply_fn, switches, variables, batch = problem
  flat, unravel = flatten_util.ravel_pytree(switches)
  def f(s):
    z = apply_fn(variables, unravel(s), batch["image"])
    if loss == "squared_error":
      return jnp.mean(0.5 * jnp.sum((z - batch["label"]) ** 2, -1))
    logp = jax.nn.log_softmax(z)
    return -jnp.mean(logp[jnp.arange(z.shape[0]), batch["label"]])
  return f, flat


def explicit_ggn_diag(problem):
  """diag((1/B) sum_b J_b^T (diag p_b - p_b p_b^T) J_b) with J from jax.jacrev of all logits."""
  apply_fn, switches, variables, batch = problem
  flat, unravel = flatten_util.ravel_pytree(switches)

  @jax.jit
  def ref(s, variables, batch):
    logits_fn = lambda s: apply_fn(variables, unravel(s), batch["image"])
    jac = jax.jacrev(logits_fn)(s)                       # [B, C, P]
    p = jax.nn.softmax(logits_fn(s))
    h_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    g = jnp.einsum("bcp,bcd,bdq->pq", jac, h_out, jac) / p.shape[0]
    return jnp.diagonal(g)

  return np.asarray(ref(flat, variables, batch))


def flat(tree):
  return np.asarray(flatten_util.ravel_pytree(tree)[0])


def run(name, problem, key=None, **opts):
  apply_fn, switches, variables, batch = problem
  fn = curvature.make_curvature_fn(name, apply_fn, **opts)
  return fn(switches, variables, batch, key)


# --------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem_name,method", [("mlp", "hvp"), ("mlp", "forward"),
                                                 ("mlp", "full"), ("convbn", "hvp")])
def test_hessian_equals_jax_hessian(problem_name, method, request):
  problem = request.getfixturevalue(problem_name)
  f, s = flat_loss(problem)
  ref = np.diag(np.asarray(jax.jit(jax.hessian(f))(s)))
  got = run("hessian", problem, method=method, chunk_size=4)  # P = 10 or 6: padding / lax.map
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(problem[1])
  np.testing.assert_allclose(flat(got), ref, rtol=1e-6, atol=1e-12)
  if problem_name == "mlp" and method == "hvp":
    assert (ref < 0).any()  # the exact Hessian diagonal can be negative; clamp=True removes that
    np.testing.assert_allclose(flat(run("hessian", problem, chunk_size=4, clamp=True)),
                               np.maximum(flat(got), 0), rtol=1e-12, atol=0)


def test_hessian_central_finite_differences(mlp):
  f, s = flat_loss(mlp)
  f = jax.jit(f)
  got = flat(run("hessian", mlp))
  eps = 1e-4
  fd = np.array([(f(s + eps * e) - 2 * f(s) + f(s - eps * e)) / eps ** 2
                 for e in np.eye(s.size)])
  np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("problem_name,mode", [("mlp", "forward"), ("mlp", "reverse"),
                                               ("mlp", "auto"), ("convbn", "forward")])
def test_ggn_equals_explicit_jthj(problem_name, mode, request):
  problem = request.getfixturevalue(problem_name)
  ref = explicit_ggn_diag(problem)
  got = flat(run("ggn", problem, mode=mode, chunk_size=3))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
  assert (got >= 0).all()


def test_ggn_equals_hessian_for_linear_model_squared_error():
  """z = (x * s) W is linear in s, the loss quadratic: GGN = Hessian = (1/B) sum_b J_b^T J_b."""
  kx, kw, ks, ky = jax.random.split(jax.random.PRNGKey(3), 4)
  x, w = jax.random.normal(kx, (B, D)), jax.random.normal(kw, (D, C))
  apply_fn = lambda v, s, images: (images * s["s"]) @ v["w"]
  problem = (apply_fn, {"s": jax.random.normal(ks, (D,))}, {"w": w},
             {"image": x, "label": jax.random.normal(ky, (B, C))})
  closed_form = np.einsum("bd,dc->d", np.asarray(x) ** 2, np.asarray(w) ** 2) / B
  for g in (run("ggn", problem, loss="squared_error", mode="forward"),
            run("ggn", problem, loss="squared_error", mode="reverse"),
            run("ggn_fast", problem, loss="squared_error"),
            run("hessian", problem, loss="squared_error")):
    np.testing.assert_allclose(flat(g), closed_form, rtol=1e-10)
  f, s = flat_loss(problem, loss="squared_error")
  np.testing.assert_allclose(np.diag(np.asarray(jax.hessian(f)(s))), closed_form, rtol=1e-10)


def test_ggn_fast_equals_ggn_without_cross_example_coupling(mlp):
  np.testing.assert_allclose(flat(run("ggn_fast", mlp)), flat(run("ggn", mlp)), rtol=1e-6,
                             atol=1e-12)
  conv = _conv_problem(use_bn=False)
  np.testing.assert_allclose(flat(run("ggn_fast", conv, chunk_size=3)),
                             explicit_ggn_diag(conv), rtol=1e-6, atol=1e-12)


def test_ggn_fast_under_batchnorm_is_a_nonnegative_approximation(convbn):
  fast, exact = flat(run("ggn_fast", convbn)), flat(run("ggn", convbn))
  assert (fast >= 0).all() and (exact >= 0).all()
  # BN couples examples, so the two differ, but they measure the same curvature scale.
  assert not np.allclose(fast, exact, rtol=1e-6)
  ratio = fast.sum() / exact.sum()
  assert 0.1 < ratio < 10, ratio


@pytest.mark.parametrize("problem_name", ["mlp", "convbn"])
def test_ggn_and_fisher_never_negative(problem_name, request):
  problem = request.getfixturevalue(problem_name)
  for name, kw in (("ggn", {}), ("ggn_fast", {}), ("fisher", {"num_samples": 3})):
    got = flat(run(name, problem, key=jax.random.PRNGKey(5), **kw))
    assert (got >= 0).all(), (name, got)
    assert (got > 0).any(), name


def test_fisher_is_unbiased_for_ggn(mlp):
  """Per-key Fisher samples (1 label each) average to the exact GGN within 5 standard errors."""
  apply_fn, switches, variables, batch = mlp
  n = 400
  one = lambda k: flat_tree(curvature.fisher(apply_fn, switches, variables, batch, k))
  samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(6), n)))
  exact = explicit_ggn_diag(mlp)
  stderr = samples.std(axis=0, ddof=1) / np.sqrt(n)
  assert (np.abs(samples.mean(0) - exact) <= 5 * stderr + 1e-12).all()


def flat_tree(tree):
  return flatten_util.ravel_pytree(tree)[0]


@pytest.mark.parametrize("matrix", ["ggn", "hessian"])
def test_hutchinson_within_statistical_error(mlp, matrix):
  apply_fn, switches, variables, batch = mlp
  n = 300
  fn = jax.jit(lambda k: curvature.hutchinson_samples(
      apply_fn, switches, variables, batch, k, num_probes=n, matrix=matrix, chunk_size=64))
  samples = np.asarray(jax.vmap(flat_tree)(fn(jax.random.PRNGKey(7))))
  exact = explicit_ggn_diag(mlp) if matrix == "ggn" else flat(run("hessian", mlp))
  stderr = samples.std(axis=0, ddof=1) / np.sqrt(n)
  assert (stderr > 0).all()
  assert (np.abs(samples.mean(0) - exact) <= 5 * stderr + 1e-12).all()
  mean = curvature.hutchinson(apply_fn, switches, variables, batch, jax.random.PRNGKey(7),
                              num_probes=n, matrix=matrix, chunk_size=64)
  np.testing.assert_allclose(flat(mean), samples.mean(0), rtol=1e-10, atol=1e-14)


def test_accumulate_is_the_mean_over_batches(mlp):
  """Without coupling, the mean of two half-batch GGNs equals the GGN of the whole batch."""
  apply_fn, switches, variables, _ = mlp
  kx, ky = jax.random.split(jax.random.PRNGKey(8))
  x, y = jax.random.normal(kx, (2 * B, D)), jax.random.randint(ky, (2 * B,), 0, C)
  halves = [{"image": x[:B], "label": y[:B]}, {"image": x[B:], "label": y[B:]}]
  fn = curvature.make_curvature_fn("ggn", apply_fn)
  acc = curvature.accumulate(fn, switches, variables, halves)
  whole = fn(switches, variables, {"image": x, "label": y})
  np.testing.assert_allclose(flat(acc), flat(whole), rtol=1e-10)
  # Keys are split per batch for stochastic estimators.
  fish = curvature.make_curvature_fn("fisher", apply_fn)
  a1 = curvature.accumulate(fish, switches, variables, halves, key=jax.random.PRNGKey(0))
  manual = [fish(switches, variables, b, jax.random.fold_in(jax.random.PRNGKey(0), m))
            for m, b in enumerate(halves)]
  np.testing.assert_allclose(flat(a1), (flat(manual[0]) + flat(manual[1])) / 2, rtol=1e-12)


def test_errors_name_the_input(mlp):
  apply_fn, switches, variables, batch = mlp
  with pytest.raises(ValueError, match="unknown curvature estimator 'nope'"):
    curvature.get_curvature_fn("nope")
  with pytest.raises(ValueError, match="key"):
    curvature.fisher(apply_fn, switches, variables, batch)
  with pytest.raises(ValueError, match="key"):
    curvature.hutchinson(apply_fn, switches, variables, batch)
  with pytest.raises(ValueError, match="label"):
    curvature.ggn(apply_fn, switches, variables, {"image": batch["image"]})
  with pytest.raises(ValueError, match="mode"):
    curvature.ggn(apply_fn, switches, variables, batch, mode="sideways")
  with pytest.raises(ValueError, match="unknown loss"):
    curvature.hessian(apply_fn, switches, variables, batch, loss="hinge")
  with pytest.raises(ValueError, match="batch accumulate|at least one batch"):
    curvature.accumulate(curvature.make_curvature_fn("ggn", apply_fn), switches, variables, [])
  assert curvature.DEFAULT_CURVATURE in curvature.CURVATURE_FNS



# --------------------------------------------------------------------------------------------------
# The real supernet (bnas_jax.models.supernet): a tiny nb201 net (3 cells, C=4, 8x8, batch 4).
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def supernet_problem(x64):
  from bnas_jax.models import supernet as supernet_lib  # pylint: disable=g-import-not-at-top
  model = supernet_lib.create_supernet("nb201", init_channels=4, num_cells=1, num_classes=C)
  kx, ky, ki, ks = jax.random.split(jax.random.PRNGKey(9), 4)
  with jax.enable_x64(False):  # the supernet initialises in float32; cast to float64 afterwards
    switches = supernet_lib.init_switches("nb201", 1)
    images = jax.random.normal(kx, (4, 8, 8, 3))
    # unsafe_rbg: threefry initialisers of this many parameters compile ~6x slower on CPU.
    ki = jax.random.key(int(jax.random.randint(ki, (), 0, 2 ** 30)), impl="unsafe_rbg")
    variables = jax.jit(functools.partial(model.init, train=True))(ki, images, switches)
  to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
  switches = jax.tree_util.tree_map(
      lambda s: s * jax.random.uniform(ks, s.shape, jnp.float64, 0.5, 1.5), to64(switches))

  def apply_fn(variables, switches, images):
    logits, _ = model.apply(variables, images, switches, train=True, mutable=["batch_stats"])
    return logits

  batch = {"image": to64(images), "label": jax.random.randint(ky, (4,), 0, C)}
  return apply_fn, switches, to64(dict(variables)), batch


def test_supernet_ggn_and_hessian(supernet_problem):
  apply_fn, switches, variables, batch = supernet_problem
  assert switches["normal"].shape == (3, 6, 5)
  got = flat(run("ggn", supernet_problem))       # P = 90 > B*C = 16: reverse mode, BN coupled
  np.testing.assert_allclose(got, explicit_ggn_diag(supernet_problem), rtol=1e-6, atol=1e-12)
  assert (got >= 0).all() and (got > 0).any()
  h = flat(run("hessian", supernet_problem, method="forward", chunk_size=45))
  f, s = flat_loss(supernet_problem)
  f = jax.jit(f)
  eps = 1e-4
  for i in np.linspace(0, s.size - 1, 6).astype(int):
    e = np.zeros(s.size)
    e[i] = eps
    fd = (f(s + e) - 2 * f(s) + f(s - e)) / eps ** 2
    np.testing.assert_allclose(h[i], fd, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# One curvature: with batch-norm statistics held fixed (the runner's `search_steps.curvature_apply`),
# every kind estimates the same diagonal, per switch, on real tiny supernets. Origin switches in
# front of BN-first ops are included (with train-mode statistics they are scale-invariant there,
# and the exact kinds gave ~0 where the per-example kinds gave O(1)).
# --------------------------------------------------------------------------------------------------

def _supernet_case(space, num_cells, seed):
  from bnas_jax import search_steps  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import supernet as supernet_lib  # pylint: disable=g-import-not-at-top
  model = supernet_lib.create_supernet(space, init_channels=4, num_cells=num_cells,
                                       num_classes=C, dw_impl="shift")
  kx, ky, ki, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  with jax.enable_x64(False):
    switches = supernet_lib.init_switches(space, num_cells)
    images = jax.random.normal(kx, (4, 8, 8, 3))
    variables = supernet_lib.init_variables(model, ki, images, switches)
  to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
  switches = jax.tree_util.tree_map(
      lambda s: s * jax.random.uniform(ks, s.shape, jnp.float64, 0.5, 1.5), to64(switches))
  batch = {"image": to64(images), "label": jax.random.randint(ky, (4,), 0, C)}
  return functools.partial(search_steps.curvature_apply, model), switches, to64(dict(variables)), batch


@pytest.fixture(scope="module", params=[("nb201", 1), ("bayesnas", 3)], ids=["nb201", "bayesnas"])
def frozen_supernet(request, x64):
  return _supernet_case(*request.param, seed=3)


def _mean_and_stderr(samples):
  samples = np.asarray(samples)
  return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])


def test_all_kinds_agree_per_switch_with_fixed_batch_stats(frozen_supernet):
  apply_fn, switches, variables, batch = frozen_supernet
  ggn = flat(run("ggn", frozen_supernet))
  assert (ggn >= 0).all()
  # Origin switches (index 0 of the last axis) feed BN-first ops in bayesnas and ReLU-conv-BN ops
  # in nb201: with the statistics held fixed their curvature is not zero.
  origin = flat(jax.tree_util.tree_map(lambda s: jnp.zeros_like(s).at[..., 0].set(1), switches))
  assert (ggn[origin == 1] > 1e-8 * ggn.max()).mean() > 0.9, ggn[origin == 1]
  # Exact kinds: per switch to 1e-6 relative (the loss is piecewise linear in each switch once
  # the statistics are fixed, so the Hessian diagonal equals the GGN diagonal).
  tol = dict(rtol=1e-6, atol=1e-9 * ggn.max())
  np.testing.assert_allclose(flat(run("ggn_fast", frozen_supernet)), ggn, **tol)
  # Both formulations of the exact Hessian diagonal on real supernets: HVPs (jvp of grad) on the
  # small case, second directional derivatives on the bayesnas case (their float64 program compiles
  # in about a quarter of the HVPs' time there).
  small = flat(switches).size < 100  # nb201: 90 switches; bayesnas: 192
  np.testing.assert_allclose(flat(run("hessian", frozen_supernet, chunk_size=None,
                                      method="hvp" if small else "forward")), ggn, **tol)
  if small:  # jacrev of every logit: the small case only (compile time)
    np.testing.assert_allclose(explicit_ggn_diag(frozen_supernet), ggn, **tol)
  # Estimators: within 5 standard errors per switch (independent draws).
  fisher_fn = curvature.make_curvature_fn("fisher", apply_fn, num_samples=8)
  fisher = [flat(fisher_fn(switches, variables, batch, jax.random.PRNGKey(k))) for k in range(24)]
  mean, se = _mean_and_stderr(fisher)
  assert (np.abs(mean - ggn) <= 5 * se + 1e-9 * ggn.max()).all(), np.max(np.abs(mean - ggn) / se)
  hut = jax.jit(lambda k: jax.vmap(flat_tree)(curvature.hutchinson_samples(
      apply_fn, switches, variables, batch, k, num_probes=256, chunk_size=64)))
  mean, se = _mean_and_stderr(hut(jax.random.PRNGKey(1)))
  assert (np.abs(mean - ggn) <= 5 * se + 1e-9 * ggn.max()).all(), np.max(np.abs(mean - ggn) / se)


def test_train_mode_batch_stats_make_kinds_disagree():
  """Without holding the statistics fixed the per-example GGN is not the exact one (why the
  runner's curvature fixes them): a control for the test above."""
  apply_fn, switches, variables, batch = _supernet_case("nb201", 1, seed=3)
  model = apply_fn.args[0]

  def train_mode(variables, switches, images):
    logits, _ = model.apply(variables, images, switches, train=True, mutable=["batch_stats"])
    return logits

  problem = (train_mode, switches, variables, batch)
  assert not np.allclose(flat(run("ggn_fast", problem)), flat(run("ggn", problem)), rtol=1e-3)
