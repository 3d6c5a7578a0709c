"""The reweighted group-l1 penalty (spec 4.1), its proximal step and the masking of pruned switches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bnas_jax.bayes.prior import (EPS_NORM, GroupTree, HardPriorState, Switches, _check_like,
                                  _check_positive, _check_switches, _float_dtype,
                                  _lambda_vector, apply_mask)

Array = jax.Array


def _omega_alive(state_or_omega, alive) -> tuple[GroupTree, GroupTree | None]:
  if isinstance(state_or_omega, HardPriorState):
    return state_or_omega.omega, state_or_omega.alive if alive is None else alive
  return state_or_omega, alive


def penalty(switches: Switches, state_or_omega: HardPriorState | GroupTree,
            lambda_origin: float, lambda_op: float, *, alive: GroupTree | None = None,
            eps: float = EPS_NORM) -> Array:
  """Reweighted group-l1 penalty ``sum_g lambda_k omega_g ||S_g||_2`` (spec 4.1).

  The norm is smoothed as ``sqrt(sum_c s_c^2 + eps) - sqrt(eps)``: the value is exactly 0 at
  ``S_g = 0`` and differs from ``||S_g||`` by less than ``sqrt(eps)``; the gradient
  ``lambda omega S / sqrt(||S||^2 + eps)`` stays finite (0) at ``S_g = 0`` and has magnitude < 1 per
  unit weight (the exact group-lasso gradient ``S/||S||`` is singular there, spec 10). omega is held
  fixed (``stop_gradient``); dead groups contribute nothing and get zero gradient.

  Args:
    switches: ``{tau: f32[n, E, K]}``.
    state_or_omega: a `HardPriorState` (its ``omega`` and ``alive`` are used) or an omega tree
      ``{tau: f32[E, K]}`` (then all groups count unless `alive` is given).
    lambda_origin: strength for origin switches (k = 0).
    lambda_op: strength for op switches (k >= 1).
    alive: optional group mask ``{tau: bool[E, K]}``; overrides the state's.
    eps: smoothing under the square root (> 0); default `EPS_NORM` = 1e-12 (sqrt = 1e-6).

  Returns:
    f32[] the penalty, to be added to the mean data loss.

  Raises:
    ValueError: mismatched cell types or shapes, non-positive eps.
  """
  _check_switches(switches)
  _check_positive(eps, "eps")
  omega, alive = _omega_alive(state_or_omega, alive)
  _check_like(omega, switches, "omega", group_level=True)
  if alive is not None:
    _check_like(alive, switches, "alive", group_level=True)
  total = 0.0
  for tau in sorted(switches):
    s = jnp.asarray(switches[tau])
    dtype = _float_dtype(s)
    w = jax.lax.stop_gradient(jnp.asarray(omega[tau], dtype))
    lam = _lambda_vector(s.shape[-1], lambda_origin, lambda_op, dtype)
    norm = jnp.sqrt(jnp.sum(s * s, axis=0) + eps) - jnp.sqrt(jnp.asarray(eps, dtype))
    term = lam * w * norm
    if alive is not None:
      term = jnp.where(jnp.asarray(alive[tau], bool), term, 0.0)
    total = total + jnp.sum(term)
  return jnp.asarray(total)


def prox_group_l1(switches: Switches, state_or_omega: HardPriorState | GroupTree,
                  lambda_origin: float, lambda_op: float, step_size: float, *,
                  alive: GroupTree | None = None) -> dict[str, Array]:
  """Proximal operator of ``step_size * penalty``: the group soft-threshold.

  ``S_g <- max(0, 1 - step_size lambda_k omega_g / ||S_g||_2) S_g``; groups with ``||S_g|| = 0`` or
  dead groups become exactly 0. Use it after a gradient step on the data loss alone
  (``penalty_mode='proximal'``), with ``step_size`` = that step's learning rate; this is exact
  proximal gradient for plain SGD and the usual heuristic with momentum.

  Args:
    switches: ``{tau: f32[n, E, K]}``.
    state_or_omega: a `HardPriorState` or an omega tree ``{tau: f32[E, K]}`` (as in `penalty`).
    lambda_origin: strength for origin switches.
    lambda_op: strength for op switches.
    step_size: the step size (>= 0).
    alive: optional group mask overriding the state's.

  Returns:
    ``{tau: f32[n, E, K]}`` the shrunk switches.
  """
  _check_switches(switches)
  omega, alive = _omega_alive(state_or_omega, alive)
  _check_like(omega, switches, "omega", group_level=True)
  if alive is not None:
    _check_like(alive, switches, "alive", group_level=True)
  out = {}
  for tau in sorted(switches):
    s = jnp.asarray(switches[tau])
    dtype = _float_dtype(s)
    lam = _lambda_vector(s.shape[-1], lambda_origin, lambda_op, dtype)
    thr = step_size * lam * jnp.asarray(omega[tau], dtype)  # [E, K]
    norm = jnp.sqrt(jnp.sum(s * s, axis=0))
    scale = jnp.where(norm > thr, 1.0 - thr / jnp.where(norm > 0, norm, 1.0), 0.0)
    if alive is not None:
      scale = jnp.where(jnp.asarray(alive[tau], bool), scale, 0.0)
    out[tau] = (s * scale[None]).astype(dtype)
  return out


def mask_updates(alive: GroupTree | None = None) -> optax.GradientTransformationExtraArgs:
  """optax transformation zeroing the updates of dead switch groups.

  Put it last in the switch optimizer so that pruned switches, once set to 0 by `apply_mask`, stay
  exactly 0 whatever the earlier transformations (momentum buffers, weight decay) hold::

    tx = optax.chain(optax.sgd(lr, momentum=0.9), bayes.mask_updates())
    updates, opt_state = tx.update(grads, opt_state, switches, alive=state.alive)

  Args:
    alive: a fixed group mask ``{tau: bool[E, K]}``. If None, the mask must be passed at every call
      as the extra argument ``alive=`` (a dynamic array: no recompilation when it shrinks).

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.
  """
  fixed = alive

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, alive=None, **extra_args):
    del params, extra_args
    mask = fixed if alive is None else alive
    if mask is None:
      raise ValueError("mask_updates() built without a mask needs alive= at update time: "
                       "tx.update(grads, opt_state, switches, alive=state.alive)")
    return apply_mask(updates, mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
