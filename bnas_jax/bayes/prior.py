"""The HARD prior state and its update (spec 4.2, 4.3, 10), the optax-style `hard_prior` factory and
the connectivity rule of pruning. See the package docstring for the notation and stable forms."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Switches = Mapping[str, Array]  # {tau: f32[n, E, K]}
GroupTree = Mapping[str, Array]  # {tau: [E, K]}

EPS_OMEGA = 1e-6  # lower clamp of omega_g (spec 10: omega = 0 when H = 0 would give gamma = inf)
EPS_NORM = 1e-12  # added under the sqrt of ||S_g|| in `penalty` (gradient finite at S_g = 0)
EPS_GAMMA = 1e-6  # floor of gamma* in the fidelity quirk only (it divides by gamma*^2)
PRUNE_MODES = ("absolute", "relative")


class HardPriorState(NamedTuple):
  """State of the HARD prior, one entry per cell type ``tau``.

  All per-cell fields are broadcast over the ``n`` cells of a group after an `update` (they
  differ per cell only after a random `init`). Dead groups have ``gamma == 0`` exactly.
  """
  gamma: dict[str, Array]  # {tau: f32[n, E, K]} prior variance after the hierarchy step, >= 0
  omega: dict[str, Array]  # {tau: f32[E, K]} tangent weight of the reweighted group-l1, > 0
  posterior_variance: dict[str, Array]  # {tau: f32[n, E, K]} Laplace C = (1/gamma + H)^-1
  curvature: dict[str, Array]  # {tau: f32[n, E, K]} H = max(h, 0) / lambda_k (kept for logging)
  alive: dict[str, Array]  # {tau: bool[E, K]} group mask; only ever shrinks
  count: Array  # i32[] number of `update` calls so far
  # {tau: f32[E, K]} group gamma of the last update *before* pruning (equal to the group gamma
  # of live groups; a group keeps the score it had when it died). Ranks an all-pruned cell.
  score: dict[str, Array]


# ------------------------------------------------------------------------------------------------
# Input checks (all on static shapes, so they also work under jit).


def _check_switches(switches: Switches, name: str = "switches") -> None:
  if not isinstance(switches, Mapping) or not switches:
    raise ValueError(f"{name} must be a non-empty dict {{cell_type: f32[n, E, K]}}, got "
                     f"{type(switches).__name__}")
  for tau, s in switches.items():
    if jnp.ndim(s) != 3:
      raise ValueError(f"{name}[{tau!r}] must have shape [n_cells, E, 1 + n_ops], got shape "
                       f"{jnp.shape(s)}; pass one array per cell type (no batch axis)")


def _check_like(tree: Mapping[str, Any], switches: Switches, name: str, group_level: bool) -> None:
  if set(tree) != set(switches):
    raise ValueError(f"{name} has cell types {sorted(tree)} but switches have {sorted(switches)}")
  for tau, s in switches.items():
    want = jnp.shape(s)[1:] if group_level else jnp.shape(s)
    if jnp.shape(tree[tau]) != want:
      raise ValueError(f"{name}[{tau!r}] has shape {jnp.shape(tree[tau])}, expected {want} "
                       f"(matching switches[{tau!r}] of shape {jnp.shape(s)})")


def _check_positive(value: Any, name: str) -> None:
  # Only concrete Python numbers can be checked; traced values pass through.
  if isinstance(value, numbers.Real) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def _lambda_vector(num_switches: int, lambda_origin, lambda_op, dtype) -> Array:
  """``f32[K]``: ``lambda_origin`` at index 0, ``lambda_op`` at 1..K-1."""
  lam = jnp.full((num_switches,), lambda_op, dtype=dtype)
  return lam.at[0].set(jnp.asarray(lambda_origin, dtype))


def _float_dtype(x: Array):
  x = jnp.asarray(x)
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


# ------------------------------------------------------------------------------------------------
# init / update.


def init(switches: Switches, *, key: Array | None = None, random_init: bool = False,
         gamma_init: float = 1.0, omega_init: float = 1.0,
         alive: GroupTree | None = None) -> HardPriorState:
  """Initial HARD-prior state for `switches`.

  Args:
    switches: ``{tau: f32[n, E, K]}``; only shapes and dtypes are read.
    key: PRNG key, required when ``random_init``.
    random_init: if True, reproduce the original code (spec 4.2 "Initial values"):
      gamma ~ U(0, 1) independently per cell and switch, omega ~ U(0, 1) per group (the original
      draws omega per cell too but only ever reads cell 0). Otherwise gamma = `gamma_init` and
      omega = `omega_init` (spec 10's reproducible default, 1 and 1).
    gamma_init: deterministic initial prior variance (> 0).
    omega_init: deterministic initial penalty weight (> 0).
    alive: optional initial group mask ``{tau: bool[E, K]}`` (default all alive); dead groups start
      with gamma = 0.

  Returns:
    A `HardPriorState` with C = gamma (the posterior variance before any curvature, H = 0), H = 0
    and ``count = 0``.

  Raises:
    ValueError: bad switch shapes, a mask of the wrong shape, ``random_init`` without `key`, or a
      non-positive `gamma_init` / `omega_init`.
  """
  _check_switches(switches)
  _check_positive(gamma_init, "gamma_init")
  _check_positive(omega_init, "omega_init")
  if random_init and key is None:
    raise ValueError("random_init=True needs a PRNG key: init(switches, key=jax.random.key(seed), "
                     "random_init=True)")
  if alive is not None:
    _check_like(alive, switches, "alive", group_level=True)
  taus = sorted(switches)
  keys = dict(zip(taus, jax.random.split(key, len(taus)))) if random_init else {}
  gamma, omega, post, curv, mask, score = {}, {}, {}, {}, {}, {}
  for tau in taus:
    shape, dtype = jnp.shape(switches[tau]), _float_dtype(switches[tau])
    if random_init:
      k_gamma, k_omega = jax.random.split(keys[tau])
      g = jax.random.uniform(k_gamma, shape, dtype)
      w = jax.random.uniform(k_omega, shape[1:], dtype)
    else:
      g = jnp.full(shape, gamma_init, dtype)
      w = jnp.full(shape[1:], omega_init, dtype)
    m = jnp.ones(shape[1:], bool) if alive is None else jnp.asarray(alive[tau], bool)
    g = jnp.where(m[None], g, 0.0)
    gamma[tau], omega[tau], post[tau] = g, w, g
    curv[tau], mask[tau] = jnp.zeros(shape, dtype), m
    score[tau] = jnp.mean(g, axis=0)
  return HardPriorState(gamma=gamma, omega=omega, posterior_variance=post, curvature=curv,
                        alive=mask, count=jnp.zeros((), jnp.int32), score=score)


def series_variance(a: Array, b: Array) -> Array:
  """``(1/a + 1/b)^-1`` for ``a, b >= 0`` (two variances in series), without NaN.

  Evaluated as ``lo / (1 + lo/hi)`` with ``lo = min(a, b)``, ``hi = max(a, b)``: exact, and gives
  0 if either is 0, ``a`` if ``b = inf``, ``inf`` if both are inf (spec 10, hierarchy step).
  """
  lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
  ratio = jnp.where(hi > 0, lo / jnp.where(hi > 0, hi, 1.0), 0.0)
  ratio = jnp.where(jnp.isinf(lo), 1.0, ratio)  # lo = inf implies hi = inf
  return lo / (1.0 + ratio)


def _omega_sq(gamma: Array, curv: Array, fidelity: bool) -> tuple[Array, Array]:
  """Posterior variance ``C`` f32[n, E, K] and ``omega^2`` f32[E, K] (spec 4.2 steps 2-3)."""
  post = gamma / (1.0 + gamma * curv)
  if not fidelity:
    return post, jnp.sum(curv / (1.0 + gamma * curv), axis=0)
  # Original code: gamma* = the last cell's gamma for every cell, abs() before the sqrt. Written
  # as |gamma* - C_c| / gamma*^2 with
  #   gamma* - C_c = (gamma* - gamma_c + gamma* gamma_c H_c) / (1 + gamma_c H_c),
  # which equals H/(1 + gamma H) exactly when gamma_c = gamma*. gamma* is floored at EPS_GAMMA so
  # that 1/gamma*^2 stays finite (the original divides by zero there).
  g_star = jnp.maximum(gamma[-1:], EPS_GAMMA)
  diff = (g_star - gamma + g_star * gamma * curv) / (1.0 + gamma * curv)
  return post, jnp.sum(jnp.abs(diff) / g_star**2, axis=0)


def update(state: HardPriorState, switches: Switches, h: Switches, *, lambda_origin: float,
           lambda_op: float, prune_threshold: float, prune_mode: str = "absolute",
           eps_omega: float = EPS_OMEGA, fidelity: bool = False,
           cells: Mapping[str, Any] | None = None) -> HardPriorState:
  """One HARD-prior update after an epoch (spec 4.2, stable forms of spec 10) plus pruning.

  Per cell type and group ``g = (e, k)`` (``lambda_k`` = `lambda_origin` for k = 0, else
  `lambda_op`):

  1. ``H_c = max(h_c, 0) / lambda_k`` (negative curvature, possible with an exact Hessian, is
     clamped);
  2. ``C_c = gamma_c / (1 + gamma_c H_c)`` with the previous per-cell ``gamma_c`` (clamped >= 0);
  3. ``omega_g = max(sqrt(sum_c H_c / (1 + gamma_c H_c)), eps_omega)``;
  4. ``gamma_raw = ||S_g||_2 / omega_g``;
  5. origin first: ``gamma_origin = gamma_raw[e, 0]`` (0 if the origin is dead); then each op
     ``gamma = series_variance(gamma_raw[e, k], gamma_origin[e])``;
  6. pruning: a live group dies when ``gamma < prune_threshold`` ('absolute') or
     ``gamma < prune_threshold * median(live gamma of the same kind in this cell type)``
     ('relative'; origin switches against the median live origin gamma, op switches against the
     median live op gamma, since the two kinds have their own lambda and scale; a median, not a
     maximum, so that one outlying group cannot prune the rest of the cell). A dead origin
     kills every op of its edge; an origin whose ops are all dead is dead too (its edge carries
     nothing).
     Dead groups never come back and get ``gamma = 0`` exactly;
  6b. connectivity (when `cells` is given, spec 3.1 dependency motif): an edge whose source node
     has no live input edge, or (single-output cells such as nb201's) whose target cannot reach
     the cell output, is killed with all its ops. Its ops would otherwise see zero input, get
     ``H = 0``, ``omega`` at its floor and a diverging ``gamma``. This is the rule of
     `bnas_jax.genotype.prune_disconnected`, so the alive mask and the derived genotype agree;
  7. gamma and omega are broadcast to every cell of the group.

  Args:
    state: the previous `HardPriorState`.
    switches: ``{tau: f32[n, E, K]}`` current switch values (after the epoch).
    h: ``{tau: f32[n, E, K]}`` diagonal curvature of the data loss w.r.t. each switch (spec 6).
    lambda_origin: regularisation strength of origin switches (> 0), spec 3.4.
    lambda_op: regularisation strength of op switches (> 0), spec 3.4 (``lambda_child``).
    prune_threshold: threshold on gamma (>= 0); 0 disables pruning (gamma is never negative).
    prune_mode: 'absolute' or 'relative' (threshold relative to the median live gamma of the same
      switch kind, origin or op, in the cell type).
    eps_omega: lower clamp of omega (> 0); keeps gamma_raw finite when H = 0.
    fidelity: reproduce the original's gamma* quirk in step 3 (see module docstring).
    cells: optional ``{tau: CellTopology}`` (``SearchSpace.cells``, static) enabling step 6b;
      without it only the origin -> op hierarchy is applied.

  Returns:
    The new `HardPriorState` (``count`` incremented). Finite for zero switches, zero or negative
    curvature and zero gammas.

  Raises:
    ValueError: mismatched cell types or shapes, non-positive lambdas / eps_omega, a negative
      threshold or an unknown `prune_mode`.
  """
  _check_switches(switches)
  _check_like(h, switches, "h", group_level=False)
  _check_like(state.gamma, switches, "state.gamma", group_level=False)
  _check_like(state.alive, switches, "state.alive", group_level=True)
  _check_positive(lambda_origin, "lambda_origin")
  _check_positive(lambda_op, "lambda_op")
  _check_positive(eps_omega, "eps_omega")
  if isinstance(prune_threshold, numbers.Real) and prune_threshold < 0:
    raise ValueError(f"prune_threshold must be >= 0 (0 disables pruning), got {prune_threshold}")
  if prune_mode not in PRUNE_MODES:
    raise ValueError(f"prune_mode must be one of {PRUNE_MODES}, got {prune_mode!r}")
  if cells is not None:
    for tau, s in switches.items():
      if tau not in cells:
        raise ValueError(f"cells lacks cell type {tau!r}; pass SearchSpace.cells of the space the "
                         f"switches belong to (it has {sorted(cells)})")
      if len(cells[tau].edges) != jnp.shape(s)[1]:
        raise ValueError(f"cells[{tau!r}] has {len(cells[tau].edges)} edges but switches[{tau!r}] "
                         f"has {jnp.shape(s)[1]} (shape {jnp.shape(s)}); wrong search space?")

  gamma, omega, post, curv, alive, score = {}, {}, {}, {}, {}, {}
  for tau in sorted(switches):
    s = jnp.asarray(switches[tau])
    dtype = _float_dtype(s)
    s = s.astype(dtype)
    n = s.shape[0]
    lam = _lambda_vector(s.shape[-1], lambda_origin, lambda_op, dtype)
    hc = jnp.maximum(jnp.asarray(h[tau], dtype), 0.0) / lam  # [n, E, K]
    alive_prev = jnp.asarray(state.alive[tau], bool)  # [E, K]
    g_prev = jnp.maximum(jnp.asarray(state.gamma[tau], dtype), 0.0)  # [n, E, K]

    c, w_sq = _omega_sq(g_prev, hc, fidelity)
    w = jnp.maximum(jnp.sqrt(w_sq), eps_omega)  # [E, K]
    norm = jnp.sqrt(jnp.sum(s * s, axis=0))  # [E, K]
    g_raw = norm / w

    g_origin = jnp.where(alive_prev[:, 0], g_raw[:, 0], 0.0)  # [E]
    g_ops = series_variance(g_raw[:, 1:], g_origin[:, None])  # [E, K-1]
    g_new = jnp.concatenate([g_origin[:, None], g_ops], axis=1)
    g_new = jnp.where(alive_prev, g_new, 0.0)

    if prune_mode == "absolute":
      thr = jnp.asarray(prune_threshold, dtype)
    else:
      # Per switch kind: origin and op gammas live on different scales (own lambda, and an op's
      # gamma is capped by its origin's through the hierarchy). The reference is the kind's
      # median live gamma, so that no single group (e.g. one with H ~ 0, hence a huge gamma) can
      # raise the threshold above every other group of the cell.
      live_g = jnp.where(alive_prev, g_new, jnp.nan)
      kind_ref = jnp.nanmedian(live_g[:, :1])[None, None]
      if live_g.shape[1] > 1:  # K = 1 (origin switches only, e.g. compression groups): no ops
        kind_ref = jnp.concatenate([kind_ref, jnp.broadcast_to(jnp.nanmedian(live_g[:, 1:]),
                                                               (1, live_g.shape[1] - 1))], axis=1)
      thr = prune_threshold * kind_ref  # [1, K]; NaN (nothing live) prunes nothing
    a = alive_prev & ~(g_new < thr)
    origin_alive = a[:, 0] & (jnp.any(a[:, 1:], axis=1) if a.shape[1] > 1 else True)
    if cells is not None:
      origin_alive = connected_edges(cells[tau], origin_alive)
    a = jnp.concatenate([origin_alive[:, None], a[:, 1:] & origin_alive[:, None]], axis=1)

    score[tau] = jnp.where(alive_prev, g_new, jnp.asarray(state.score[tau], dtype))
    g_new = jnp.where(a, g_new, 0.0)
    gamma[tau] = jnp.broadcast_to(g_new[None], (n, *g_new.shape))
    omega[tau], post[tau], curv[tau], alive[tau] = w, c, hc, a
  return HardPriorState(gamma=gamma, omega=omega, posterior_variance=post, curvature=curv,
                        alive=alive, count=state.count + 1, score=score)



class HardPrior(NamedTuple):
  """The HARD prior as an optax-style pair of pure functions (`hard_prior`).

  Attributes:
    init: ``init(switches, key=None) -> HardPriorState`` (`init` with the factory's settings).
    update: ``update(h, state, switches) -> (switches, state)``: like an optax
      ``update(updates, state, params)``, the curvature ``h`` ``{tau: f32[n, E, K]}`` comes first
      and the switches are the parameters; returns the switches with pruned groups set exactly to
      0 (`apply_mask`) and the new state (`update`).
  """
  init: Callable[..., HardPriorState]
  update: Callable[..., tuple[dict[str, Array], HardPriorState]]


def hard_prior(*, lambda_origin: float, lambda_op: float, prune_threshold: float,
               prune_mode: str = "absolute", eps_omega: float = EPS_OMEGA, fidelity: bool = False,
               cells: Mapping[str, Any] | None = None, random_init: bool = False,
               gamma_init: float = 1.0, omega_init: float = 1.0) -> HardPrior:
  """The HARD prior (spec 4.2, 4.4) as ``(init, update)``, its settings bound once.

  ``prior = hard_prior(lambda_origin=0.01, lambda_op=0.01, prune_threshold=1e-3)``, then
  ``state = prior.init(switches)`` and after each epoch and curvature pass
  ``switches, state = prior.update(h, state, switches)``. Both are pure and jit-able; they compute
  exactly `init`, `update` and `apply_mask` with these keywords.

  Args:
    lambda_origin, lambda_op, prune_threshold, prune_mode, eps_omega, fidelity, cells: as
      `update`.
    random_init, gamma_init, omega_init: as `init`.

  Raises:
    ValueError: a non-positive lambda, eps_omega, gamma_init or omega_init, a negative
      prune_threshold or an unknown prune_mode, named here rather than at the first update.
  """
  for name, value in (("lambda_origin", lambda_origin), ("lambda_op", lambda_op),
                      ("eps_omega", eps_omega), ("gamma_init", gamma_init),
                      ("omega_init", omega_init)):
    _check_positive(value, name)
  if isinstance(prune_threshold, numbers.Real) and prune_threshold < 0:
    raise ValueError(f"prune_threshold must be >= 0 (0 disables pruning), got {prune_threshold}")
  if prune_mode not in PRUNE_MODES:
    raise ValueError(f"prune_mode must be one of {PRUNE_MODES}, got {prune_mode!r}")

  def init_fn(switches: Switches, key: Array | None = None) -> HardPriorState:
    return init(switches, key=key, random_init=random_init, gamma_init=gamma_init,
                omega_init=omega_init)

  def update_fn(h: Switches, state: HardPriorState,
                switches: Switches) -> tuple[dict[str, Array], HardPriorState]:
    state = update(state, switches, h, lambda_origin=lambda_origin, lambda_op=lambda_op,
                   prune_threshold=prune_threshold, prune_mode=prune_mode, eps_omega=eps_omega,
                   fidelity=fidelity, cells=cells)
    return apply_mask(switches, state.alive), state

  return HardPrior(init_fn, update_fn)


def apply_mask(switches: Switches, alive: GroupTree) -> dict[str, Array]:
  """Sets the switches of dead groups to exactly 0.

  Works for any switch-shaped tree (switches, gradients, momentum buffers).

  Args:
    switches: ``{tau: f32[n, E, K]}``.
    alive: ``{tau: bool[E, K]}`` group mask.

  Returns:
    ``{tau: f32[n, E, K]}`` with ``out[tau][:, e, k] == 0`` wherever ``not alive[tau][e, k]``.
  """
  _check_switches(switches)
  _check_like(alive, switches, "alive", group_level=True)
  return {tau: jnp.where(jnp.asarray(alive[tau], bool)[None], s, jnp.zeros_like(s))
          for tau, s in switches.items()}


def connected_edges(topology: Any, edge_alive: Array) -> Array:
  """Live edges that can carry signal from the cell inputs to the cell output (spec 3.1).

  Iterated to a fixed point with static incidence matrices (jit-able): an intermediate node is
  live iff some live edge enters it, and an edge survives only if its source node is live. For a
  cell with a single output node (nb201) an edge must also end in a node that reaches the output.
  Same rule as `bnas_jax.genotype.prune_disconnected`.

  Args:
    topology: a ``CellTopology`` (``num_inputs``, ``num_nodes``, ``edges``, ``concat``).
    edge_alive: ``bool[E]``, the edges whose origin switch (and at least one op) is alive.

  Returns:
    ``bool[E]``, a subset of `edge_alive`.
  """
  n_nodes = topology.num_inputs + topology.num_nodes
  src = np.zeros((len(topology.edges), n_nodes), np.float32)
  tgt = np.zeros_like(src)
  for i, e in enumerate(topology.edges):
    src[i, e.source] = tgt[i, e.target] = 1.0
  is_input = np.arange(n_nodes) < topology.num_inputs
  live = jnp.asarray(edge_alive, bool)
  for _ in range(topology.num_nodes):  # DAG depth <= num_nodes
    node_live = is_input | (live.astype(jnp.float32) @ tgt > 0)
    live = live & (src @ node_live.astype(jnp.float32) > 0)
  if len(topology.concat) == 1:
    reach = np.isin(np.arange(n_nodes), topology.concat)
    reach = jnp.asarray(reach)
    for _ in range(topology.num_nodes):
      into_reach = live & (tgt @ reach.astype(jnp.float32) > 0)
      reach = reach | (into_reach.astype(jnp.float32) @ src > 0)
    live = live & (tgt @ reach.astype(jnp.float32) > 0)
  return live
