"""The paper's fast layer-wise Hessian: one backward pass with every linear coefficient squared.

Spec sections 6.1-6.3. The diagonal recursion of Botev et al. (spec 6.1),

  ``diag H_l = f'(a_l)^2 * ((W_{l+1} o W_{l+1})^T diag H_{l+1})``  (+ the f'' term, see below),

pulls the diagonal of the output curvature back through each layer with *squared* coefficients. For
any network that is the same as running the network's backward pass (vector-Jacobian product) with
every linear coefficient squared, fed at the logits with the diagonal output curvature. The layer
rules of spec 6.2 all follow from this one rule: squared weights for dense, 1 x 1, k x k, depthwise
and dilated convolutions (each tap is one coefficient), squared ReLU masks (= the masks), batch norm
with fixed statistics as ``(gamma * rsqrt(var + eps))^2``, ``1/n^2`` per window for n-pixel average
pooling, routing to the argmax for max pooling, ``s^2`` through a switch ``y = s * u`` and, at the
switch itself, ``h_s = sum_{b,h,w,c} u^2 * H_y`` (the pre-activation curvature at its output), sums
at sum nodes, splits at concatenations and sums over consumers at fan-outs.

Implementation (`squared_vjp`): ``jax.vjp`` of the function, then ``jax.make_jaxpr`` of its backward
pass. That jaxpr is linear in the cotangent; every other input is a residual of the forward pass
(activations, masks, weights). A small interpreter evaluates it on the diagonal curvature:

* equations without a cotangent-dependent input are evaluated as they are;
* ``mul``, ``div`` (by a residual), ``dot_general`` and ``conv_general_dilated`` get their residual
  operand squared; ``neg`` becomes the identity and ``sub`` an ``add`` (signs squared);
* 0/1 and structural primitives (`PASS_THROUGH`: add, reshape, broadcast, slice, pad, select,
  gather / scatter-add, concatenate, reduce_sum, ...) are evaluated unchanged;
* ``jit``, ``remat``, ``custom_jvp_call`` / ``custom_vjp_call`` are interpreted inline, ``scan`` is
  rebuilt as a ``lax.scan`` of the interpreted body, ``cond`` as a ``lax.switch``;
* any other primitive with a cotangent input raises ValueError naming it (no silent wrong answer).

So custom-VJP operations (the shift-and-multiply depthwise convolution and the pools of
`bnas_jax.models.layers`) are handled through their hand-written backward passes, and the recursion
runs in reverse mode only (no ``jvp``). Cost: one forward pass (the residuals) and one backward
pass, about one training step (``bench/bench_curvature.py``).

What the recursion drops, relative to the exact Gauss-Newton diagonal (`bnas_jax.curvature.ggn`):

* off-diagonal output curvature: softmax cross-entropy contributes ``diag(p) - diag(p)^2`` only,
  not ``-p_c p_c'`` for c != c';
* cross terms between paths: where a value reaches the output along several paths (fan-out to
  several consumers, sum nodes, the taps of a convolution reading one pixel, the C logits of one
  example), the recursion sums the squared path products instead of squaring their sum, i.e. it
  keeps only the diagonal of every intermediate curvature (``diag(W^T H W) ~ (W o W)^T diag H``);
* the ``f''(a) * dE/dz`` terms of the Hessian (zero for ReLU, linear maps, max and average
  pooling; this is a Gauss-Newton-type diagonal, non-negative by construction);
* batch-norm statistics: held fixed (`bnas_jax.models.layers.frozen_batch_stats`), which is the
  definition of the curvature every estimator of `bnas_jax.curvature` measures.

It is exact where no value reaches an output along two paths and every output's curvature is
diagonal, e.g. a chain of elementwise layers with one switch per class, or the weights of one dense
or convolution layer with one softmax per (example, position) (tests/test_fast_hessian.py).

The original code's quirks (spec 6.3: averaging over rows at each layer, the dilated-kernel copy
bug, stride-1 scatter) are not reproduced; ``fidelity=True`` of `recursive` reproduces its head
and pool constants only (see there).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax import lax
import jax.extend.core as jex
import jax.numpy as jnp

from bnas_jax.models import layers

PyTree = Any

# Primitives whose cotangent outputs are sums / copies / selections of their cotangent inputs with
# coefficients 0 or 1: the squared recursion evaluates them unchanged. Non-cotangent operands of
# these (e.g. the zero buffer of ``add_any`` or ``dynamic_update_slice``, the pad value) are zero in
# a linear backward pass; they are used as they are.
PASS_THROUGH = frozenset({
    "add", "add_any", "broadcast_in_dim", "concatenate", "convert_element_type", "copy",
    "copy_p", "cumsum", "dynamic_slice", "dynamic_update_slice", "expand_dims", "gather", "pad",
    "reduce_precision", "reduce_sum", "reduce_window_sum", "reshape", "rev", "scatter-add",
    "scatter_add", "select_and_scatter_add", "select_n", "slice", "split", "squeeze",
    "transpose", "unstack",
})
# Bilinear primitives: the operand that is not a cotangent is squared.
SQUARED_OPERAND = frozenset({"mul", "dot_general", "conv_general_dilated"})
# Higher-order primitives interpreted inline (their sub-jaxpr is the whole computation).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
SUPPORTED = PASS_THROUGH | SQUARED_OPERAND | {"div", "neg", "sub", "scan", "cond"} | set(_INLINE)


def _open(j) -> tuple[jex.Jaxpr, Sequence[Any]]:
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
  if isinstance(j, jex.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


def _scopes(eqn) -> tuple[str, ...]:
  """Names of the `jax.named_scope` scopes in the equation's name stack, outermost first."""
  stack = getattr(eqn.source_info.name_stack, "stack", ())
  return tuple(s.name for s in stack if type(s).__name__ == "Scope")


# --------------------------------------------------------------------------------------------------
# Which variables depend on the cotangent ("tangent" flags), without evaluating anything.
# --------------------------------------------------------------------------------------------------

def _scan_carry_flags(body: jex.Jaxpr, num_consts: int, num_carry: int,
                      flags: Sequence[bool]) -> tuple[list[bool], list[bool]]:
  """Fixed point of the carry flags of a scan body; returns (input flags, output flags)."""
  flags = list(flags)
  while True:
    out = _flags(body, flags)
    carry = [a or b for a, b in zip(flags[num_consts:num_consts + num_carry], out[:num_carry])]
    if carry == flags[num_consts:num_consts + num_carry]:
      return flags, out
    flags[num_consts:num_consts + num_carry] = carry


def _eqn_flags(eqn, fin: Sequence[bool]) -> list[bool]:
  name = eqn.primitive.name
  if not any(fin):
    return [False] * len(eqn.outvars)
  if name in _INLINE:
    return _flags(_open(eqn.params[_INLINE[name]])[0], fin)
  if name == "scan":
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    flags, out = _scan_carry_flags(_open(p["jaxpr"])[0], nc, ncar, fin)
    return flags[nc:nc + ncar] + out[ncar:]
  if name == "cond":
    outs = [_flags(b.jaxpr, fin[1:]) for b in eqn.params["branches"]]
    return [any(f) for f in zip(*outs)]
  return [True] * len(eqn.outvars)


def _flags(jaxpr: jex.Jaxpr, fin: Sequence[bool]) -> list[bool]:
  """Which outputs of `jaxpr` depend on the inputs flagged in `fin` (constvars: no)."""
  t = dict(zip(jaxpr.invars, fin))
  get = lambda v: (not isinstance(v, jex.Literal)) and t.get(v, False)
  for eqn in jaxpr.eqns:
    for v, f in zip(eqn.outvars, _eqn_flags(eqn, [get(v) for v in eqn.invars])):
      t[v] = f
  return [get(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------------------------------
# The interpreter.
# --------------------------------------------------------------------------------------------------

class _Context:
  """Enclosing named scopes and the coefficient rules (see `squared_vjp`)."""

  def __init__(self, rules: Mapping[str, Callable[[jax.Array], jax.Array]],
               scopes: tuple[str, ...] = ()):
    self.rules, self.scopes = rules, scopes

  def inside(self, eqn) -> "_Context":
    return _Context(self.rules, self.scopes + _scopes(eqn))

  def rule(self, eqn):
    """The coefficient rule of the innermost scope of `eqn` that has one, or None."""
    for s in reversed(self.scopes + _scopes(eqn)):
      if s in self.rules:
        return self.rules[s]
    return None


def _unsupported(eqn, ctx: _Context, why: str) -> ValueError:
  where = "/".join(ctx.scopes + _scopes(eqn)) or "top level"
  return ValueError(
      f"squared_vjp: primitive {eqn.primitive.name!r} ({where}) {why}. The diagonal recursion "
      f"supports linear backward passes built from {sorted(SUPPORTED)}; "
      "differentiate a function whose backward pass uses only these.")


def _bind(eqn, invals):
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _scale(t: jax.Array, factor) -> jax.Array:
  return (t * jnp.asarray(factor, t.dtype)).astype(t.dtype)


def _squared_eqn(ctx: _Context, eqn, invals: list, fin: list[bool]) -> tuple[list, list[bool]]:
  """Evaluates one equation with a cotangent input in the squared recursion."""
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name in ("add", "add_any", "sub"):
    for v, f in zip(eqn.invars, fin):
      if not f and isinstance(v, jex.Literal) and jnp.any(jnp.asarray(v.val) != 0):
        raise _unsupported(eqn, ctx, "adds a nonzero constant to a cotangent (not linear)")
  if name in PASS_THROUGH:
    return _bind(eqn, invals), [True] * n_out
  if name == "neg":
    return [invals[0]], [True]
  if name == "sub":
    return [lax.add(*invals)], [True]
  if name in SQUARED_OPERAND or name == "div":
    if sum(fin) != 1:
      raise _unsupported(eqn, ctx, "multiplies two cotangent-dependent values (not linear)")
    if name == "div" and not fin[0]:
      raise _unsupported(eqn, ctx, "divides by a cotangent-dependent value (not linear)")
    i_t = fin.index(True)
    t, c = invals[i_t], invals[1 - i_t]
    rule = ctx.rule(eqn) if name in ("mul", "div") else None
    if rule is not None:  # e.g. fidelity constants of the original code
      coef = (1.0 / c) if name == "div" else c
      return [_scale(t, rule(coef))], [True]
    c2 = c * c
    new = [t, c2] if i_t == 0 else [c2, t]
    return _bind(eqn, new), [True]
  if name in _INLINE:
    jaxpr, consts = _open(eqn.params[_INLINE[name]])
    return _eval(ctx.inside(eqn), jaxpr, consts, invals, fin)
  if name == "scan":
    return _scan(ctx.inside(eqn), eqn, invals, fin)
  if name == "cond":
    return _cond(ctx.inside(eqn), eqn, invals, fin)
  raise _unsupported(eqn, ctx, "has a cotangent-dependent input and no squared-recursion rule")


def _scan(ctx: _Context, eqn, invals: list, fin: list[bool]) -> tuple[list, list[bool]]:
  p = eqn.params
  body, body_consts = _open(p["jaxpr"])
  nc, ncar = p["num_consts"], p["num_carry"]
  flags, out_flags = _scan_carry_flags(body, nc, ncar, fin)
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]

  def step(carry, x):
    outs, _ = _eval(ctx, body, body_consts, [*consts, *carry, *x], flags)
    return outs[:ncar], outs[ncar:]

  carry, ys = lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"])
  return [*carry, *ys], flags[nc:nc + ncar] + out_flags[ncar:]


def _cond(ctx: _Context, eqn, invals: list, fin: list[bool]) -> tuple[list, list[bool]]:
  if fin[0]:
    raise _unsupported(eqn, ctx, "branches on a cotangent-dependent index")
  branches = eqn.params["branches"]
  out_flags = [any(f) for f in zip(*[_flags(b.jaxpr, fin[1:]) for b in branches])]

  def branch_fn(b):
    return lambda *ops: _eval(ctx, b.jaxpr, b.consts, list(ops), fin[1:])[0]

  outs = lax.switch(invals[0], [branch_fn(b) for b in branches], *invals[1:])
  return list(outs), out_flags


def _eval(ctx: _Context, jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
          fin: Sequence[bool]) -> tuple[list, list[bool]]:
  """Evaluates `jaxpr` with the inputs flagged in `fin` in the squared recursion."""
  env: dict = {}
  tan: dict = {}
  read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
  is_t = lambda v: (not isinstance(v, jex.Literal)) and tan.get(v, False)
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x, f in zip(jaxpr.invars, args, fin):
    env[v], tan[v] = x, f
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    fe = [is_t(v) for v in eqn.invars]
    if any(fe):
      outs, fo = _squared_eqn(ctx, eqn, invals, fe)
    else:
      outs, fo = _bind(eqn, invals), [False] * len(eqn.outvars)
    for v, x, f in zip(eqn.outvars, outs, fo):
      if not isinstance(v, jex.DropVar):
        env[v], tan[v] = x, f
  return [read(v) for v in jaxpr.outvars], [is_t(v) for v in jaxpr.outvars]


def _dce(jaxpr: jex.Jaxpr) -> jex.Jaxpr:
  """Dead-code elimination (e.g. the kernel gradients that custom VJPs compute and vjp discards),
  so that the interpreter neither traces nor rejects unused equations. Identity if unavailable."""
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
    new = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]
  except (ImportError, AttributeError, TypeError):
    return jaxpr
  same_inputs = (len(new.constvars) == len(jaxpr.constvars)
                 and len(new.invars) == len(jaxpr.invars))
  return new if same_inputs else jaxpr


def squared_vjp(fn: Callable[..., PyTree], *primals: PyTree,
                coefficient_rules: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None
                ) -> tuple[PyTree, Callable[[PyTree], tuple[PyTree, ...]]]:
  """Like ``jax.vjp``, but the pull-back runs the backward pass with squared coefficients.

  ``out, pullback = squared_vjp(fn, *primals)``; ``pullback(d)`` for ``d`` shaped like ``out`` (a
  diagonal curvature at the output, >= 0) returns, per primal, ``sum over paths p of
  (prod of the linear coefficients along p)^2 * d[end of p]``, i.e. the diagonal recursion of spec
  6.1 (the module docstring lists the terms it drops). For d >= 0 the result is >= 0.

  Args:
    fn: a differentiable function of `primals` (any pytrees of float arrays); its backward pass
      may use custom VJPs, ``lax.scan``, ``jax.checkpoint``, ``jax.jit``.
    *primals: the point.
    coefficient_rules: ``{scope name: rule}``: a ``mul`` / ``div`` of a cotangent by a residual
      coefficient ``a`` (``1 / c`` for a division by c) inside a `jax.named_scope` of that name
      gets the factor ``rule(a)`` instead of ``a^2`` (innermost matching scope wins). Used for the
      original code's pool constants (`FIDELITY_RULES`).

  Returns:
    ``(out, pullback)``; ``pullback(d) -> tuple`` of pytrees like `primals`, same dtypes.

  Raises:
    ValueError (from ``pullback``): naming the primitive and its scopes, when the backward pass
      contains a primitive with a cotangent input that has no squared rule (e.g. a nonlinear
      function of the cotangent, or a ``while`` loop).
  """
  out, vjp_fn = jax.vjp(fn, *primals)
  ctx = _Context(dict(coefficient_rules or {}))

  def pullback(d: PyTree) -> tuple[PyTree, ...]:
    closed, shapes = jax.make_jaxpr(vjp_fn, return_shape=True)(d)
    jaxpr = _dce(closed.jaxpr)
    flat_d = jax.tree_util.tree_leaves(d)
    outs, _ = _eval(ctx, jaxpr, closed.consts, flat_d, [True] * len(flat_d))
    outs = [jnp.asarray(o, s.dtype) for o, s in zip(outs, jax.tree_util.tree_leaves(shapes))]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outs)

  return out, pullback


# --------------------------------------------------------------------------------------------------
# The curvature estimator.
# --------------------------------------------------------------------------------------------------

# The original code's pool constants (spec 6.2): the global average pool passes 0.5 * H (instead of
# (1/(H W))^2 * H), a k x k average pool 1/k^2 (instead of 1/k^4).
FIDELITY_RULES: dict[str, Callable[[jax.Array], jax.Array]] = {
    layers.GLOBAL_AVG_POOL_SCOPE: lambda a: 0.5,
    layers.AVG_POOL_SCOPE: lambda a: a,
}


def output_curvature_diag(logits: jax.Array, labels: jax.Array, *,
                          loss: str = "softmax_cross_entropy",
                          fidelity: bool = False) -> jax.Array:
  """Diagonal of the output Hessian of the mean loss, f32[B, C] like `logits`.

  * softmax cross-entropy: ``p (1 - p) / B`` (the diagonal of ``(diag p - p p^T) / B``); with
    ``fidelity=True`` only the target class, ``p_y (1 - p_y) / B`` (the original code's head, spec
    6.2), 0 elsewhere;
  * squared error ``0.5 ||z - y||^2``: ``1 / B`` (exact: that Hessian is diagonal).

  Raises:
    ValueError: for an unknown loss, or ``fidelity`` with a loss other than cross-entropy.
  """
  b = logits.shape[0]
  if loss == "softmax_cross_entropy":
    p = jax.nn.softmax(logits, axis=-1)
    d = p * (1 - p)
    if fidelity:
      d = d * jax.nn.one_hot(labels, logits.shape[-1], dtype=d.dtype)
  elif loss == "squared_error":
    if fidelity:
      raise ValueError("fidelity=True reproduces the original's softmax cross-entropy head; "
                       "use loss='softmax_cross_entropy'")
    d = jnp.ones_like(logits)
  else:
    raise ValueError(f"unknown loss {loss!r}; choose 'softmax_cross_entropy' or 'squared_error'")
  return lax.stop_gradient(d / b).astype(logits.dtype)


def recursive(apply_fn, switches: PyTree, variables: PyTree, batch, key: jax.Array | None = None,
              *, loss: str = "softmax_cross_entropy", fidelity: bool = False,
              chunk_size: int | None = None) -> PyTree:
  """The paper's fast Hessian (spec 6.1, 6.2): diagonal recursion, one forward + one backward pass.

  ``h_s = sum_{b, h, w, c} u^2 * H_y`` for every switch ``y = s * u``, where ``H_y`` is the output
  curvature diagonal pulled back to y by `squared_vjp` (the module docstring lists the dropped
  terms). Curvature of the *mean* loss over the batch with batch-norm statistics held fixed: the
  apply function is traced inside `bnas_jax.models.layers.frozen_batch_stats` (the same
  definition as the other estimators of `bnas_jax.curvature`). Non-negative by construction.

  Args:
    apply_fn: ``(variables, switches, images) -> logits f32[B, C]``; reverse-mode differentiable
      (custom-VJP ops are fine, no ``jvp`` is used).
    switches: pytree of float arrays (shared by all examples).
    variables: held constant.
    batch: ``{'image': f32[B, ...], 'label': i32[B]}`` (``f32[B, C]`` for squared error).
    key: unused (deterministic).
    loss: ``'softmax_cross_entropy'`` or ``'squared_error'``.
    fidelity: reproduce the original code's constants (spec 6.2, 6.3) for side-by-side
      comparisons: target-class-only head ``p_y (1 - p_y)``, 0.5 at the global average pool and
      ``1/n`` instead of ``1/n^2`` per n-pixel window of average pooling (1/9 for 3 x 3; the pools
      of `bnas_jax.models.layers` mark these coefficients with named scopes). Its per-layer row
      averaging, the dilated-conv and stride quirks are not reproduced. Units stay those of the
      mean loss (the original sums over the batch: multiply by B).
    chunk_size: ignored (accepted for the runner's common options; there is one backward pass).

  Returns:
    pytree like `switches`, same dtypes, >= 0.

  Raises:
    ValueError: malformed batch, unknown loss, or a primitive the recursion cannot square.
  """
  del key, chunk_size
  # Imported here: bnas_jax.curvature registers this estimator (imports this module).
  from bnas_jax import curvature as curvature_lib  # pylint: disable=g-import-not-at-top
  curvature_lib._check_switches(switches)  # pylint: disable=protected-access
  images, labels = curvature_lib._check_batch(batch, loss)  # pylint: disable=protected-access
  with layers.frozen_batch_stats():
    logits, pullback = squared_vjp(lambda s: apply_fn(variables, s, images), switches,
                                   coefficient_rules=FIDELITY_RULES if fidelity else None)
    d = output_curvature_diag(logits, labels, loss=loss, fidelity=fidelity)
    (h,) = pullback(d)
  return h
