"""The HARD prior: reweighted group-ARD state, its update, the penalty and pruning.

Modules: `bnas_jax.bayes.prior` (state, `init`, `update`, `hard_prior`, `apply_mask`,
`connected_edges`), `bnas_jax.bayes.penalty` (`penalty`, `prox_group_l1`, `mask_updates`) and
`bnas_jax.bayes.readouts` (`group_gamma`, `calibration`, `summaries`); their public names are
re-exported here (``from bnas_jax import bayes``).

Pure, jit-able functions in the optax style (an ``init``/``update`` pair over a NamedTuple
state). No I/O and no config reads: hyper-parameters come in as plain arguments.

Notation (spec sections 3.3, 4). Per cell type ``tau`` the switches are ``s = switches[tau]``,
``f32[n, E, K]`` with ``K = 1 + n_ops`` and index 0 = the edge's origin switch. The copies of one
(edge, switch) across the ``n`` cells of the type form one group ``g = (tau, e, k)`` with group
vector ``S_g = s[:, e, k]``. ``lambda_k`` is ``lambda_origin`` for ``k = 0``, else ``lambda_op``.

One outer iteration of BayesNAS (spec 4.4, 11):

1. train weights and switches for an epoch on ``data_loss + penalty(switches, state, ...)``
   (reweighted group-l1, spec 4.1), or with `prox_group_l1` steps instead of its gradient;
2. compute the diagonal curvature ``h`` of the data loss w.r.t. the switches
   (``bnas_jax.curvature``);
3. ``state = update(state, switches, h, ...)`` (spec 4.2 in the stable forms of spec 10); this
   also prunes groups whose prior variance ``gamma`` fell below a threshold;
4. ``switches = apply_mask(switches, state.alive)`` so that pruned switches are exactly zero, and
   keep them there with `mask_updates` in the switch optimizer.

Stable forms used by `update` (spec 4.3, 10), for ``H = h / lambda_k`` (``h`` clamped at 0) and
the previous per-cell prior variance ``gamma >= 0``:

* posterior variance ``C = (1/gamma + H)^-1 = gamma / (1 + gamma H)`` (exactly 0 at
  ``gamma = 0``, no division by ``gamma``);
* tangent weight ``omega_g^2 = sum_c (1/gamma_c - C_c/gamma_c^2) = sum_c H_c/(1 + gamma_c H_c)``
  (no cancellation as ``gamma -> 0``; never negative), then ``omega_g = max(sqrt(.), eps_omega)``;
* ``gamma_raw = ||S_g||_2 / omega_g``;
* hierarchy (origin first, then ops): ``gamma_op = (1/gamma_raw + 1/gamma_origin)^-1`` evaluated
  as ``min / (1 + min/max)`` of the pair, which is exact, needs no eps and gives 0 for (0, 0),
  ``x`` for (x, inf) and inf for (inf, inf) instead of NaN.

Fidelity note (spec 4.2 step 3, 9.4): the original code evaluates ``1/gamma* - C_c/gamma*^2``
with ``gamma*`` = the gamma of the *last* cell of the type for every cell ``c`` (a leftover loop
variable) and takes ``abs`` before the square root. This is a bug: the ARD tangent slope of cell
``c`` needs its own ``gamma_c``. It only matters when the per-cell gammas differ, i.e. at the first
update after the original's random ``U(0, 1)`` initialisation (afterwards gamma is broadcast over
the group). `update` uses the per-cell form; ``fidelity=True`` reproduces the quirk.
"""

from bnas_jax.bayes.penalty import penalty, prox_group_l1, mask_updates
from bnas_jax.bayes.prior import (EPS_OMEGA, EPS_NORM, EPS_GAMMA, PRUNE_MODES, Array, Switches,
                                  GroupTree, HardPriorState, init, series_variance, update,
                                  HardPrior, hard_prior, apply_mask, connected_edges)
from bnas_jax.bayes.readouts import group_gamma, calibration, summaries

__all__ = [
    'EPS_OMEGA', 'EPS_NORM', 'EPS_GAMMA', 'PRUNE_MODES', 'Array', 'Switches', 'GroupTree',
    'HardPriorState', 'init', 'series_variance', 'update', 'HardPrior', 'hard_prior',
    'apply_mask', 'connected_edges', 'penalty', 'prox_group_l1', 'mask_updates', 'group_gamma',
    'calibration', 'summaries'
]
