"""The search step functions under the pruned-op formulations of the supernet.

``model.pruned_ops='zero'`` keeps the full supernet's program for every alive mask (pruned ops are
computed and multiplied by their zero switch); ``'skip'`` compiles a pruned supernet that never
computes them. Both must move the search state identically.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax import bayes
from bnas_jax import search
from bnas_jax import search_steps
from bnas_jax import xla_flags
from bnas_jax.data import sharding
from bnas_jax.search_space import spaces


def _config(pruned_ops):
  config = search.default_config()
  config.space = "bayesnas"
  config.model.init_channels = 4
  config.model.num_cells = 3
  config.model.pruned_ops = pruned_ops
  config.curvature.kind = "ggn_fast"
  return config


def _pruned_mask(sp):
  """Two ops pruned on every edge and one whole edge of each cell type dead (the live edges keep
  one op set: one loop per cell phase under 'skip', which keeps this test's compile short)."""
  mask = spaces.full_mask(sp)
  for m in mask.values():
    m[:, 1 + sp.ops.index("dil5")] = False
    m[:, 1 + sp.ops.index("max")] = False
    m[3, :] = False  # edge 3 dead
  return mask


def _state(config, mask, mesh):
  counts = search_steps.cell_counts(config)
  shapes = spaces.get_space(config.space).switch_shapes(counts)
  state = jax.jit(lambda k: search_steps.init_state(config, 10, shapes, k, (16, 16, 3)))(
      search_steps.init_key(0))
  rng = np.random.default_rng(1)
  alive = {t: jnp.asarray(m) for t, m in mask.items()}
  switches = {t: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
              for t, s in state["switches"].items()}
  state = dict(state, switches=bayes.apply_mask(switches, alive),
               prior=state["prior"]._replace(alive=alive))
  return state


def test_zero_pruned_ops_moves_the_state_like_the_pruned_supernet():
  sp = spaces.get_space("bayesnas")
  mask = _pruned_mask(sp)
  mesh = sharding.make_mesh()
  keys = {p: search_steps.StepKey.create(_config(p), 10, mask, mesh) for p in ("skip", "zero")}
  # 'zero' compiles the full supernet's program for any mask; 'skip' one per mask.
  assert keys["zero"].alive is None and keys["skip"].alive is not None
  assert keys["zero"] == search_steps.StepKey.create(_config("zero"), 10, None, mesh)

  rng = np.random.default_rng(2)
  # Placed as the runner places them, so that each program compiles once.
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  put = lambda tree: jax.device_put(jax.tree.map(np.array, tree), repl)  # fresh: steps donate
  batches = [jax.device_put(
      {"image": np.asarray(rng.normal(size=(4, 16, 16, 3)), np.float32),
       "label": np.asarray(rng.integers(0, 10, size=(4,)), np.int32)},
      sharding.batch_sharding(mesh)) for _ in range(2)]
  start = jax.device_get(_state(_config("skip"), mask, mesh))
  out = {}
  for p, key in keys.items():
    fns = search_steps.step_fns(key)
    state, acc = put(start), put(search_steps.new_train_acc())
    state, acc = fns.warmup_step(state, acc, batches[0])
    for b in batches:
      state, acc = fns.search_step(state, acc, b)
    ev = fns.eval_step(state, put(search_steps.new_eval_acc()), batches[0])
    variables = {k: state[k] for k in ("params", "batch_stats")}
    h = fns.curvature_fn(state["switches"], variables, batches[1], None)
    prior, switches = fns.prior_update(state["prior"], state["switches"], h)
    out[p] = jax.device_get((state, acc, ev, h, prior, switches))

  (s_skip, acc_skip, ev_skip, h_skip, prior_skip, sw_skip) = out["skip"]
  (s_zero, acc_zero, ev_zero, h_zero, prior_zero, sw_zero) = out["zero"]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  for k in ("params", "switches", "opt_w", "opt_s", "step"):
    jax.tree.map(close, s_zero[k], s_skip[k])
  jax.tree.map(close, acc_zero, acc_skip)  # loss, penalty, gradient norms included
  jax.tree.map(close, ev_zero, ev_skip)
  jax.tree.map(close, (prior_zero, sw_zero), (prior_skip, sw_skip))
  assert float(acc_skip["switch_grad_norm"]) > 0
  # The curvature of live groups agrees; of pruned groups it is 0 when skipped and not when
  # computed with a zero switch (the prior update ignores it).
  for t in h_skip:
    m = np.broadcast_to(mask[t], h_skip[t].shape)
    close(np.where(m, h_zero[t], 0), h_skip[t])
    assert np.all(h_skip[t][~m] == 0) and np.any(h_zero[t][~m] != 0)
  # Running statistics: equal, except those of pruned ops, which 'skip' leaves as they were
  # (nothing reads them) and 'zero' keeps updating.
  differ = 0
  for a, b, b0 in zip(jax.tree.leaves(s_zero["batch_stats"]), jax.tree.leaves(s_skip["batch_stats"]),
                      jax.tree.leaves(start["batch_stats"])):
    rows = ~np.isclose(a, b, rtol=2e-5, atol=1e-6).reshape(a.shape[0], -1).all(axis=1)
    if a.ndim == 2 and rows.any():  # stacked per edge: [E, C]
      np.testing.assert_array_equal(b[rows], b0[rows])
      differ += int(rows.sum())
    else:
      close(a, b)
  assert differ > 0


def test_curvature_cpu_opt_level_reaches_the_compile_and_keeps_the_diagonal(
    monkeypatch, full_xla_optimisation):
  """``curvature.cpu_opt_level=1`` jits the runner's curvature pass with
  `xla_flags.curvature_compiler_options` (XLA:CPU's backend level 1 under full optimisation): the
  same diagonal as the default compile, to float32 rounding."""
  config = search.default_config()
  config.space = "nb201"
  config.model.init_channels = 4
  config.model.num_cells = 1
  config.curvature.kind = "ggn_fast"
  config.curvature.cpu_opt_level = 1
  mesh = sharding.make_mesh()
  options = xla_flags.curvature_compiler_options(1, "cpu")
  assert options == {"xla_backend_optimization_level": 1}
  seen = []
  monkeypatch.setattr(xla_flags, "curvature_compiler_options",
                      lambda level, platform=None: seen.append((level, platform)) or options)
  # Unmemoised: other tests build the same key with the suite's settings.
  fns = search_steps.step_fns.__wrapped__(search_steps.StepKey.create(config, 10, None, mesh))
  assert seen == [(1, "cpu")]
  counts = search_steps.cell_counts(config)
  shapes = spaces.get_space("nb201").switch_shapes(counts)
  state = jax.jit(lambda k: search_steps.init_state(config, 10, shapes, k, (16, 16, 3)))(
      search_steps.init_key(0))
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=(4,)), jnp.int32)}
  variables = {k: state[k] for k in ("params", "batch_stats")}
  args = (state["switches"], variables, batch, None)
  level1 = fns.curvature_fn(*args)
  default = jax.jit(fns.curvature_fn._fn.__wrapped__)(*args)  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(level1), jax.tree.leaves(default)):
    assert np.all(np.isfinite(a)) and np.any(a > 0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(np.max(b)))
