"""Laplace curvature of the data loss with respect to the switches: pure diagonal estimators.

Every estimator in `CURVATURE_FNS` has the signature

  ``fn(apply_fn, switches, variables, batch, key=None, **opts) -> pytree shaped like switches``

* ``apply_fn(variables, switches, images) -> logits f32[B, C]`` is a pure function (for the supernet:
  `bnas_jax.search_steps.curvature_apply`, see "The curvature" below).
* ``switches`` is any pytree of float arrays (for the supernet ``{tau: f32[n_tau, E, K]}``).
* ``batch = {'image': f32[B, ...], 'label': i32[B]}`` (for ``loss='squared_error'`` the label is a
  regression target ``f32[B, C]``).

The curvature (one quantity for every estimator). The Laplace step of BayesNAS needs the curvature
of the data loss with respect to the switches. For the supernet it is defined on the loss with
each batch-norm layer's statistics *held fixed at this batch's values*: train-mode normalisation
with the batch mean and variance, but no derivative through them
(`bnas_jax.models.layers.frozen_batch_stats`, entered by `search_steps.curvature_apply`). This is the
form of the original's layer recursion (spec 6.2, BN as a fixed scale) and of common Laplace
libraries (a network evaluated at fixed normalisation), and it makes every kind below estimate the
same diagonal:

* examples no longer interact, so ``ggn_fast`` (per-example rows) *is* the exact ``ggn``;
* the logits are piecewise linear in each single switch (a switch scales one tensor on each path,
  and ReLU, max-pool and BN with fixed statistics are piecewise linear), so the Hessian diagonal
  equals the GGN diagonal and ``hessian`` agrees with ``ggn`` per switch;
* ``fisher`` and ``hutchinson`` are unbiased estimators of that same diagonal;
* an origin switch in front of a BN-first op is no longer exactly scale-invariant (with
  differentiated batch statistics its exact curvature was ~0 while the per-example kinds gave
  O(1): different quantities).

tests/test_curvature.py checks the agreement per switch on tiny nb201 and bayesnas supernets. The
layer-wise recursion (``recursive``, `bnas_jax.fast_hessian`) approximates the same diagonal.

Units (spec 4.2, 6.4). Every estimator returns (an estimate of) the diagonal of the curvature of the
*mean* loss over the batch,

  ``L(s) = (1/B) sum_b loss(logits_b(s), label_b)``,

with the data loss the mean softmax cross-entropy by default. The caller (the search runner)
multiplies it by ``bayes.curvature_scale`` and divides by lambda before the prior update.
`accumulate` averages the per-batch diagonals over M batches (equal weight per batch), i.e. it
returns the curvature of the mean loss over the M * B examples for the batch-independent parts.

Estimators (cost in units of one forward pass F, for P switches, B examples, C classes):

* ``hessian``: exact diagonal of the Hessian, one Hessian-vector product (forward-over-reverse) per
  switch, ``P`` HVPs chunked with ``vmap`` / ``lax.map``. Can be negative; see ``clamp``.
* ``ggn``: exact diagonal of the generalised Gauss-Newton matrix ``J^T H_out J`` of the batch
  function, ``J = d logits[B, C] / d s`` including the coupling through batch-norm statistics.
  Forward mode (``P`` Jacobian-vector products) or reverse mode (``B * C`` vector-Jacobian products),
  whichever is fewer (``mode='auto'``).
* ``ggn_fast``: per-example switch copies; ``C`` vector-Jacobian products give the per-example rows.
  Exact GGN diagonal for models whose examples do not interact; an approximation under train-mode
  batch norm (see its docstring). Default (`DEFAULT_CURVATURE`): measured cost see
  ``bench/bench_curvature.py``.
* ``fisher``: Monte-Carlo Fisher diagonal from labels sampled from the model (unbiased for the GGN
  diagonal of softmax cross-entropy; per-example switch copies as in ``ggn_fast``).
* ``hutchinson``: Rademacher-probe estimate ``E[z * (M z)]`` of the diagonal of ``M`` = GGN or
  Hessian; `hutchinson_samples` returns the per-probe estimates.

The output-space curvature is factorised as ``H_out,b = sum_f v_{b,f} v_{b,f}^T`` (per example b):
for softmax cross-entropy ``v_{b,c} = sqrt(p_{b,c}) (e_c - p_b)`` (so ``sum_c v v^T = diag(p) - p p^T``),
for squared error ``0.5 ||z - y||^2`` the identity. All functions are pure and un-jitted; use
`make_curvature_fn` for a jitted closure.

Source: spec sections 4.2, 6.4, 10; estimator structure after kfac-jax (``ggn_exact``,
``fisher_gradients``, ``ggn_curvature_prop`` modes) and laplax (GGN / Hessian diagonals).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Mapping

import jax
from jax import flatten_util
import jax.numpy as jnp

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
Batch = Mapping[str, jax.Array]

# The default: C vector-Jacobian products per batch (C = classes) give the exact per-example GGN
# diagonal; the exact batch GGN needs one product per switch; costs in bench/bench_curvature.py.
DEFAULT_CURVATURE = "ggn_fast"


# --------------------------------------------------------------------------------------------------
# Losses: per-example loss and a factor of the per-example output-space Hessian.
# --------------------------------------------------------------------------------------------------

def _ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example, f32[B]; `labels` i32[B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _ce_factor(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """V f32[B, C, C] with V_b V_b^T = diag(p_b) - p_b p_b^T; column c = sqrt(p_c)(e_c - p)."""
  del labels
  p = jax.nn.softmax(logits, axis=-1)
  eye = jnp.eye(logits.shape[-1], dtype=logits.dtype)
  return (eye[None, :, :] - p[:, :, None]) * jnp.sqrt(p)[:, None, :]


def _se_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Squared error 0.5 ||z - y||^2 per example, f32[B]; `labels` f32[B, C]."""
  return 0.5 * jnp.sum((logits - labels) ** 2, axis=-1)


def _se_factor(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Identity factor f32[B, C, C] (the output Hessian of 0.5 ||z - y||^2 is I)."""
  del labels
  b, c = logits.shape
  return jnp.broadcast_to(jnp.eye(c, dtype=logits.dtype), (b, c, c))


# name -> (per-example loss f32[B], output-Hessian factor f32[B, C, F])
LOSSES: dict[str, tuple[Callable[..., jax.Array], Callable[..., jax.Array]]] = {
    "softmax_cross_entropy": (_ce_loss, _ce_factor),
    "squared_error": (_se_loss, _se_factor),
}


def _get_loss(loss: str):
  try:
    return LOSSES[loss]
  except KeyError:
    raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}") from None


def _check_batch(batch: Batch, loss: str) -> tuple[jax.Array, jax.Array]:
  if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
    raise ValueError("batch must be a dict {'image': f32[B, ...], 'label': ...}; got "
                     f"{type(batch).__name__} with keys {list(getattr(batch, 'keys', list)())}")
  images, labels = batch["image"], batch["label"]
  if loss == "softmax_cross_entropy" and jnp.ndim(labels) != 1:
    raise ValueError(f"batch['label'] must be integer class ids i32[B] for softmax cross-entropy; "
                     f"got shape {jnp.shape(labels)}")
  if jnp.shape(labels)[0] != jnp.shape(images)[0]:
    raise ValueError(f"batch['image'] and batch['label'] disagree on the batch size: "
                     f"{jnp.shape(images)[0]} vs {jnp.shape(labels)[0]}")
  return images, labels


def _check_switches(switches: PyTree) -> None:
  leaves = jax.tree_util.tree_leaves(switches)
  if not leaves:
    raise ValueError("switches is an empty pytree; pass the switch arrays {tau: f32[n, E, K]}")
  for x in leaves:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"switches must be floating-point arrays; got dtype {jnp.result_type(x)}")


def mean_loss(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
              loss: str = "softmax_cross_entropy") -> jax.Array:
  """The data loss whose curvature every estimator measures: mean over the batch, f32[]."""
  loss_fn, _ = _get_loss(loss)
  images, labels = _check_batch(batch, loss)
  return jnp.mean(loss_fn(apply_fn(variables, switches, images), labels))


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------

def _chunked_map(fn: Callable[[jax.Array], jax.Array], xs: jax.Array,
                 chunk_size: int | None) -> jax.Array:
  """``vmap(fn)(xs)`` evaluated `chunk_size` rows at a time with ``lax.map`` (rows zero-padded).

  Args:
    fn: maps one row ``xs[i]`` to an array.
    xs: f32[N, ...] rows.
    chunk_size: rows per vectorised call; ``None`` or >= N: a single ``vmap``.

  Returns:
    ``fn`` stacked over the N rows.
  """
  n = xs.shape[0]
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size}")
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(xs)
  n_chunks = -(-n // chunk_size)
  pad = n_chunks * chunk_size - n
  xs_p = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)], axis=0)
  out = jax.lax.map(jax.vmap(fn), xs_p.reshape((n_chunks, chunk_size) + xs.shape[1:]))
  out = jax.tree_util.tree_map(lambda o: o.reshape((n_chunks * chunk_size,) + o.shape[2:])[:n], out)
  return out


def _per_example_copies(switches: PyTree, batch_size: int) -> PyTree:
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (batch_size,) + jnp.shape(x)), switches)


def clamp_nonnegative(diag: PyTree) -> PyTree:
  """``max(h, 0)`` leaf-wise: the HARD prior update needs H >= 0 (spec 10)."""
  return jax.tree_util.tree_map(lambda h: jnp.maximum(h, 0), diag)


# --------------------------------------------------------------------------------------------------
# Estimators.
# --------------------------------------------------------------------------------------------------

def hessian(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
            key: jax.Array | None = None, *, loss: str = "softmax_cross_entropy",
            method: str = "hvp", chunk_size: int | None = 32, clamp: bool = False) -> PyTree:
  """Exact diagonal of the Hessian of the mean loss with respect to the switches.

  ``h_i = e_i^T (d^2 L / ds ds) e_i`` for every scalar switch i. Batch-norm statistics are
  differentiated through (the loss is that of the batch function).

  Args:
    apply_fn: ``(variables, switches, images) -> logits f32[B, C]``.
    switches: pytree of float arrays, P scalars in total.
    variables: model variables (held constant).
    batch: ``{'image', 'label'}``.
    key: unused (deterministic).
    loss: a key of `LOSSES`.
    method: ``'hvp'``: P Hessian-vector products (``jvp`` of ``grad`` at one linearisation point),
      `chunk_size` at a time; ``'forward'``: P second directional derivatives
      ``d^2/dt^2 L(s + t e_i)`` (``jvp`` of ``jvp``, forward-over-forward: no backward pass);
      ``'full'``: ``jax.hessian`` of the flat loss, then its diagonal (the full
      P x P matrix and all P tangents at once: tiny problems only).
    chunk_size: basis vectors per vectorised HVP call (memory ~ chunk_size x one backward pass).
    clamp: if True return ``max(h, 0)``. The exact Hessian diagonal can be negative; the prior update
      needs H >= 0 (spec 10), so either pass ``clamp=True`` or clamp in the caller.

  Returns:
    pytree like `switches`: the Hessian diagonal of the mean loss, same dtypes.

  Raises:
    ValueError: for an unknown `method` or `loss`, or a malformed batch.
  """
  del key
  _check_switches(switches)
  flat, unravel = flatten_util.ravel_pytree(switches)
  obj = lambda s: mean_loss(apply_fn, unravel(s), variables, batch, loss)
  if method == "full":
    diag = jnp.diagonal(jax.hessian(obj)(flat))
  elif method == "forward":
    def second_derivative(u):
      first = lambda t: jax.jvp(obj, (t,), (u,))[1]
      return jax.jvp(first, (flat,), (u,))[1]
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    diag = _chunked_map(second_derivative, basis, chunk_size)
  elif method == "hvp":
    _, hvp = jax.linearize(jax.grad(obj), flat)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    diag = _chunked_map(lambda u: jnp.vdot(u, hvp(u)), basis, chunk_size)
  else:
    raise ValueError(f"hessian method must be 'hvp', 'forward' or 'full'; got {method!r}")
  if clamp:
    diag = jnp.maximum(diag, 0)
  return unravel(diag)


def ggn(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
        key: jax.Array | None = None, *, loss: str = "softmax_cross_entropy", mode: str = "auto",
        chunk_size: int | None = 32) -> PyTree:
  """Exact diagonal of the generalised Gauss-Newton matrix of the mean loss (spec 6.4).

  ``G = (1/B) J^T blockdiag_b(H_out,b) J`` with ``J = d logits / d s`` the Jacobian of all B*C logits
  of the batch (batch-norm statistics included, so examples may be coupled) and ``H_out,b`` the
  per-example output Hessian (``diag(p_b) - p_b p_b^T`` for softmax cross-entropy). G is positive
  semi-definite, so its diagonal is >= 0 (up to round-off it is a sum of squares).

  Args:
    apply_fn, switches, variables, batch: see the module docstring.
    key: unused (deterministic).
    loss: a key of `LOSSES`.
    mode: ``'forward'``: P Jacobian-vector products (one column of J each);
      ``'reverse'``: B*C vector-Jacobian products ``J^T w`` with w = an output factor ``v_{b,f}`` on
      example b; ``'auto'``: whichever needs fewer products.
    chunk_size: products per vectorised call.

  Returns:
    pytree like `switches` with the GGN diagonal.

  Raises:
    ValueError: for an unknown `mode` or `loss`, or a malformed batch.
  """
  del key
  _check_switches(switches)
  loss_fn, factor_fn = _get_loss(loss)
  images, labels = _check_batch(batch, loss)
  del loss_fn
  flat, unravel = flatten_util.ravel_pytree(switches)
  logits_fn = lambda s: apply_fn(variables, unravel(s), images)
  logits, jvp_fn = jax.linearize(logits_fn, flat)
  b, c = logits.shape
  factor = jax.lax.stop_gradient(factor_fn(logits, labels))  # [B, C, F]
  n_f = factor.shape[-1]
  if mode == "auto":
    mode = "forward" if flat.size <= b * n_f else "reverse"
  if mode == "forward":
    def column(u):
      jz = jvp_fn(u)                                     # [B, C]
      return jnp.sum(jnp.einsum("bc,bcf->bf", jz, factor) ** 2) / b
    diag = _chunked_map(column, jnp.eye(flat.size, dtype=flat.dtype), chunk_size)
  elif mode == "reverse":
    vjp_fn = jax.linear_transpose(jvp_fn, flat)
    # Row r = (example b, factor f): cotangent supported on example b only.
    w = jnp.einsum("bcf,bd->bfdc", factor, jnp.eye(b, dtype=factor.dtype)).reshape(b * n_f, b, c)
    rows = _chunked_map(lambda wr: vjp_fn(wr.astype(logits.dtype))[0] ** 2, w, chunk_size)
    diag = jnp.sum(rows, axis=0) / b
  else:
    raise ValueError(f"ggn mode must be 'auto', 'forward' or 'reverse'; got {mode!r}")
  return unravel(diag.astype(flat.dtype))


def _per_example_rows(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, images: jax.Array,
                      cotangent_fn: Callable[[jax.Array], jax.Array],
                      chunk_size: int | None) -> PyTree:
  """Sum over cotangent columns f of the squared per-example-copy gradients, divided by B.

  ``cotangent_fn(logits) -> W f32[B, C, F]``; for each f one VJP of ``sum_b <W[b, :, f], z_b>`` with
  respect to per-example switch copies ``{leaf: [B, ...]}`` gives the rows ``r_{b,f}``; returns
  ``(1/B) sum_{b,f} r_{b,f}^2`` shaped like `switches`.
  """
  b = images.shape[0]
  copies = _per_example_copies(switches, b)
  logits, vjp_fn = jax.vjp(lambda s: apply_fn(variables, s, images), copies)
  if logits.shape[0] != b:
    raise ValueError(f"apply_fn returned logits of shape {logits.shape} for {b} images")
  w = jax.lax.stop_gradient(cotangent_fn(logits))        # [B, C, F]
  w = jnp.moveaxis(w, -1, 0).astype(logits.dtype)        # [F, B, C]

  def sq_rows(wf):
    (g,) = vjp_fn(wf)
    return jax.tree_util.tree_map(lambda x: jnp.sum(x ** 2, axis=0), g)

  per_f = _chunked_map(sq_rows, w, chunk_size)
  return jax.tree_util.tree_map(lambda x, s: (jnp.sum(x, axis=0) / b).astype(s.dtype),
                                per_f, switches)


def ggn_fast(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
             key: jax.Array | None = None, *, loss: str = "softmax_cross_entropy",
             chunk_size: int | None = None) -> PyTree:
  """GGN diagonal from per-example Jacobian rows, C reverse-mode passes (spec 6.4).

  The switches are replicated per example, ``{leaf: [B, ...]}`` (``apply_fn`` must accept a leading
  per-example axis: example b is scaled by its own copy, as the supernet does). With the factor
  ``H_out,b = sum_f v_{b,f} v_{b,f}^T`` one VJP of ``sum_b <v_{b,f}, logits_b>`` per f returns the rows
  ``r_{b,f} = d/ds_b sum_b' <v_{b',f}, logits_b'>`` for all b at once, and

    ``h = (1/B) sum_{b,f} r_{b,f}^2``  (>= 0).

  Approximation: if examples do not interact (no train-mode batch norm), ``r_{b,f} = J_b^T v_{b,f}``
  and h equals the exact GGN diagonal (`ggn`). Train-mode batch norm couples examples through the batch
  statistics: then the row of copy b also collects the effect of s_b on the other examples' logits
  (through the statistics), and the products between different copies' rows, which the exact GGN of
  the batch function contains, are dropped. The result stays a non-negative Gauss-Newton-type
  diagonal; bench/bench_curvature.py and tests/test_curvature.py compare it with `ggn`.

  Cost: one forward pass plus F (= C classes) backward passes with respect to the switches only.

  Args:
    apply_fn, switches, variables, batch: see the module docstring.
    key: unused (deterministic).
    loss: a key of `LOSSES`.
    chunk_size: backward passes per vectorised call (``None``: all F at once).

  Returns:
    pytree like `switches`.
  """
  del key
  _check_switches(switches)
  _, factor_fn = _get_loss(loss)
  images, labels = _check_batch(batch, loss)
  return _per_example_rows(apply_fn, switches, variables, images,
                           lambda z: factor_fn(z, labels), chunk_size)


def fisher(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
           key: jax.Array | None = None, *, num_samples: int = 1,
           chunk_size: int | None = None) -> PyTree:
  """Monte-Carlo Fisher diagonal with labels sampled from the model (softmax cross-entropy only).

  For each example b and sample j, ``y ~ Categorical(p_b)`` and ``g = p_b - e_y`` (the logit gradient
  of the cross-entropy at the sampled label); ``E_y[g g^T] = diag(p_b) - p_b p_b^T``, so
  ``h = (1/(B J)) sum_{b,j} (J_b^T g_{b,j})^2`` is an unbiased estimate of the `ggn_fast` diagonal
  (same per-example-copy rows, same batch-norm caveat) with 1 instead of C backward passes per sample.
  Non-negative by construction.

  Args:
    apply_fn, switches, variables, batch: see the module docstring.
    key: PRNG key for the sampled labels (required).
    num_samples: sampled labels per example (J).
    chunk_size: backward passes per vectorised call.

  Returns:
    pytree like `switches`.

  Raises:
    ValueError: if `key` is None or `num_samples` < 1.
  """
  if key is None:
    raise ValueError("fisher samples labels: pass key=jax.random.PRNGKey(...)")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1; got {num_samples}")
  _check_switches(switches)
  images, _ = _check_batch(batch, "softmax_cross_entropy")

  def cotangents(logits):
    p = jax.nn.softmax(logits, axis=-1)
    ys = jax.random.categorical(key, logits, axis=-1, shape=(num_samples,) + logits.shape[:1])
    g = p[None] - jax.nn.one_hot(ys, logits.shape[-1], dtype=logits.dtype)   # [J, B, C]
    return jnp.moveaxis(g, 0, -1) / jnp.sqrt(num_samples).astype(logits.dtype)

  return _per_example_rows(apply_fn, switches, variables, images, cotangents, chunk_size)


def hutchinson_samples(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
                       key: jax.Array | None = None, *, num_probes: int = 16,
                       matrix: str = "ggn", loss: str = "softmax_cross_entropy",
                       chunk_size: int | None = 16) -> PyTree:
  """Per-probe Hutchinson estimates ``z * (M z)``, z Rademacher, M = GGN or Hessian of the mean loss.

  Each probe's estimate is unbiased for diag(M); their mean is `hutchinson`, and their sample
  standard deviation / sqrt(num_probes) its standard error.

  Args:
    apply_fn, switches, variables, batch: see the module docstring.
    key: PRNG key for the probes (required).
    num_probes: number of Rademacher probes.
    matrix: ``'ggn'`` (``J^T H_out J z`` by one JVP + one VJP, exact batch function) or ``'hessian'``
      (one HVP per probe).
    loss: a key of `LOSSES`.
    chunk_size: probes per vectorised call.

  Returns:
    pytree like `switches` with a leading probe axis ``[num_probes, ...]``.

  Raises:
    ValueError: if `key` is None, `num_probes` < 1 or `matrix` is unknown.
  """
  if key is None:
    raise ValueError("hutchinson draws random probes: pass key=jax.random.PRNGKey(...)")
  if num_probes < 1:
    raise ValueError(f"num_probes must be >= 1; got {num_probes}")
  _check_switches(switches)
  _, factor_fn = _get_loss(loss)
  images, labels = _check_batch(batch, loss)
  flat, unravel = flatten_util.ravel_pytree(switches)
  if matrix == "ggn":
    logits, jvp_fn = jax.linearize(lambda s: apply_fn(variables, unravel(s), images), flat)
    vjp_fn = jax.linear_transpose(jvp_fn, flat)
    factor = jax.lax.stop_gradient(factor_fn(logits, labels))          # [B, C, F]
    b = logits.shape[0]

    def mvp(z):
      t = jnp.einsum("bc,bcf->bf", jvp_fn(z), factor)
      return vjp_fn(jnp.einsum("bf,bcf->bc", t, factor) / b)[0]
  elif matrix == "hessian":
    _, mvp = jax.linearize(jax.grad(lambda s: mean_loss(apply_fn, unravel(s), variables, batch,
                                                        loss)), flat)
  else:
    raise ValueError(f"hutchinson matrix must be 'ggn' or 'hessian'; got {matrix!r}")
  probes = jax.random.rademacher(key, (num_probes, flat.size), dtype=flat.dtype)
  est = _chunked_map(lambda z: z * mvp(z), probes, chunk_size)         # [num_probes, P]
  return jax.vmap(unravel)(est)


def hutchinson(apply_fn: ApplyFn, switches: PyTree, variables: PyTree, batch: Batch,
               key: jax.Array | None = None, *, num_probes: int = 16, matrix: str = "ggn",
               loss: str = "softmax_cross_entropy", chunk_size: int | None = 16,
               clamp: bool = False) -> PyTree:
  """Hutchinson estimate of diag(M), the mean of `hutchinson_samples` over the probes.

  Unbiased but noisy (entries can be negative even for the GGN); ``clamp=True`` returns
  ``max(h, 0)``. Cost per probe: one JVP + one VJP (GGN) or one HVP (Hessian), independent of P,
  hence for very large switch sets.

  Args: as `hutchinson_samples`, plus ``clamp``.

  Returns:
    pytree like `switches`.
  """
  samples = hutchinson_samples(apply_fn, switches, variables, batch, key, num_probes=num_probes,
                               matrix=matrix, loss=loss, chunk_size=chunk_size)
  out = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), samples)
  return clamp_nonnegative(out) if clamp else out


# The paper's fast layer-wise Hessian (spec 6.1, 6.2); it imports this module's checks lazily.
from bnas_jax import fast_hessian  # pylint: disable=g-import-not-at-top,wrong-import-position

CURVATURE_FNS: dict[str, Callable[..., PyTree]] = {
    "hessian": hessian,
    "ggn": ggn,
    "ggn_fast": ggn_fast,
    "fisher": fisher,
    "hutchinson": hutchinson,
    "recursive": fast_hessian.recursive,
}


def get_curvature_fn(name: str) -> Callable[..., PyTree]:
  """The estimator `name` from `CURVATURE_FNS`.

  Raises:
    ValueError: naming the unknown estimator and the registered ones.
  """
  try:
    return CURVATURE_FNS[name]
  except KeyError:
    raise ValueError(f"unknown curvature estimator {name!r}; choose one of "
                     f"{sorted(CURVATURE_FNS)}") from None


# Estimators built from reverse-mode products only (per-example VJPs); the others use jvp /
# linearize and need every op of the network to support forward-mode AD.
REVERSE_MODE_KINDS = ("ggn_fast", "fisher", "recursive")


def make_curvature_fn(name: str, apply_fn: ApplyFn, *, jit: bool = True,
                      **opts) -> Callable[[PyTree, PyTree, Batch, jax.Array | None], PyTree]:
  """A closure ``(switches, variables, batch, key=None) -> diag`` of estimator `name` with `opts`.

  Args:
    name: a key of `CURVATURE_FNS`.
    apply_fn: see the module docstring; closed over (static).
    jit: wrap the closure in ``jax.jit`` (compiled once per input shape).
    **opts: keyword options of the estimator (static).

  Returns:
    the (jitted) closure.
  """
  fn = functools.partial(get_curvature_fn(name), apply_fn, **opts)

  def curvature(switches, variables, batch, key=None):
    return fn(switches, variables, batch, key)

  return jax.jit(curvature) if jit else curvature


def accumulate(diag_fn: Callable[[PyTree, PyTree, Batch, jax.Array | None], PyTree],
               switches: PyTree, variables: PyTree, batches: Iterable[Batch],
               key: jax.Array | None = None,
               progress: Callable[[int, float], None] | None = None) -> PyTree:
  """Mean of ``diag_fn(switches, variables, batch, key_m)`` over M batches.

  Convention: each batch contributes the curvature of its own *mean* loss, and the M results get
  equal weight, so the output is in the same units as one batch (curvature of the mean loss per
  example), with less noise. Scaling to a dataset-sized sum is the caller's job.

  Args:
    diag_fn: e.g. ``make_curvature_fn('ggn_fast', apply_fn)``.
    switches, variables: as for the estimators (held fixed across batches).
    batches: an iterable of M >= 1 batches.
    key: PRNG key, split per batch (``None`` for deterministic estimators).
    progress: called as ``progress(batches_done, seconds_since_start)`` once each batch's
      result is computed (it then waits for the device after every batch), e.g.
      `bnas_jax.phases.PassProgress`; None: no waiting, no calls.

  Returns:
    pytree like `switches`.

  Raises:
    ValueError: if `batches` is empty.
  """
  total, m = None, 0
  start = time.perf_counter()
  for batch in batches:
    k = None if key is None else jax.random.fold_in(key, m)
    h = diag_fn(switches, variables, batch, k)
    total = h if total is None else jax.tree_util.tree_map(jnp.add, total, h)
    m += 1
    if progress is not None:
      jax.block_until_ready(total)
      progress(m, time.perf_counter() - start)
  if m == 0:
    raise ValueError("accumulate needs at least one batch; `batches` was empty")
  return jax.tree_util.tree_map(lambda x: x / m, total)
