"""Read-outs of the HARD prior state: group gamma, calibration quantiles of gamma * H, summaries."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from bnas_jax.bayes.prior import HardPriorState

Array = jax.Array


def group_gamma(state: HardPriorState) -> dict[str, Array]:
  """Group prior variance ``{tau: f32[E, K]}`` (mean over cells; all cells agree after an update).

  Suitable as ``scores`` for ``bnas_jax.genotype.derive``.
  """
  return {tau: jnp.mean(g, axis=0) for tau, g in state.gamma.items()}


def _masked_stats(x: Array, mask: Array) -> tuple[Array, Array, Array]:
  x = jnp.where(mask, x, jnp.nan)
  any_live = jnp.any(mask)
  return tuple(jnp.where(any_live, f(x), 0.0) for f in (jnp.nanmin, jnp.nanmedian, jnp.nanmax))


def calibration(gamma_prev: Mapping[str, Array], state: HardPriorState) -> dict[str, Array]:
  """Where the Laplace step of the last `update` sat, per cell type and switch kind (spec 6.4).

  ``x = gamma_prev * H`` compares the scaled curvature ``H = h / lambda`` with the prior precision
  ``1 / gamma`` of the same switch. For ``x << 1``, ``omega^2 = sum_c H_c / (1 + x_c)`` tends to
  ``sum_c H_c`` and the curvature decides; for ``x >> 1`` it tends to ``sum_c 1 / gamma_c`` and
  gamma follows the switch size alone (``||S_g|| / sqrt(n)`` at a fixed point).

  Args:
    gamma_prev: ``{tau: f32[n, E, K]}`` the prior variances the update started from (the
      previous state's ``gamma``).
    state: the state `update` returned (its ``curvature`` is H).

  Returns:
    ``'{tau}/{origin|op}/gammaH_{q10|q50|q90}'``, ``'.../H_median'`` and ``'.../inv_gamma_median'``
    over the switches whose gamma_prev was > 0 (0 where there are none).
  """
  out = {}
  for tau in sorted(state.curvature):
    g, h = jnp.asarray(gamma_prev[tau]), jnp.asarray(state.curvature[tau])
    for kind, sl in (("origin", slice(0, 1)), ("op", slice(1, None))):
      gk, hk = g[..., sl], h[..., sl]
      if gk.shape[-1] == 0:  # K = 1: no op switches
        continue
      live = gk > 0
      x = jnp.where(live, gk * hk, jnp.nan)
      inv = jnp.where(live, 1.0 / jnp.where(live, gk, 1.0), jnp.nan)
      stats = {f"gammaH_q{int(q * 100)}": jnp.nanquantile(x, q) for q in (0.1, 0.5, 0.9)}
      stats["H_median"] = jnp.nanmedian(jnp.where(live, hk, jnp.nan))
      stats["inv_gamma_median"] = jnp.nanmedian(inv)
      any_live = jnp.any(live)
      for name, v in stats.items():
        out[f"{tau}/{kind}/{name}"] = jnp.where(any_live, v, 0.0)
  return out


def summaries(state: HardPriorState) -> dict[str, Array]:
  """Scalars for logging: ``'{tau}/{field}_{min|median|max}'`` and live counts.

  Statistics run over live groups only (0 when none is alive); ``field`` is gamma, omega, C
  (posterior variance) and H (scaled curvature). Counts: ``'{tau}/live_groups'``,
  ``'{tau}/live_switches'`` (groups x cells), ``'{tau}/live_edges'`` (live origin) and
  ``'{tau}/live_ops'`` (live op groups), plus ``'live_groups'`` summed over types and ``'count'``.
  """
  out = {"count": state.count}
  total = jnp.zeros((), jnp.int32)
  for tau in sorted(state.alive):
    alive = jnp.asarray(state.alive[tau], bool)
    n = state.gamma[tau].shape[0]
    cell_mask = jnp.broadcast_to(alive[None], state.gamma[tau].shape)
    fields = {"gamma": (state.gamma[tau], cell_mask), "omega": (state.omega[tau], alive),
              "C": (state.posterior_variance[tau], cell_mask),
              "H": (state.curvature[tau], cell_mask)}
    for name, (x, m) in fields.items():
      for stat, v in zip(("min", "median", "max"), _masked_stats(x, m)):
        out[f"{tau}/{name}_{stat}"] = v
    groups = jnp.sum(alive, dtype=jnp.int32)
    out[f"{tau}/live_groups"] = groups
    out[f"{tau}/live_switches"] = groups * n
    out[f"{tau}/live_edges"] = jnp.sum(alive[:, 0], dtype=jnp.int32)
    out[f"{tau}/live_ops"] = jnp.sum(alive[:, 1:], dtype=jnp.int32)
    total = total + groups
  out["live_groups"] = total
  return out
