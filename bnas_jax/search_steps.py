"""The search's model, state and step functions: pure, module level, bound with `functools.partial`.

* `train_step(state, acc, batch, update_switches, *, ...)`: one SGD step of the warm-up
  (``update_switches=False``) or search epoch (``True``), spec 5 steps 1-2;
* `eval_step(state, acc, batch, *, ...)`: the supernet's NLL / correct / count sums on a batch;
* `prior_update(prior, switches, h, *, hard_prior)`: `bayes.update` plus the mask of pruned
  switches (spec 4.2, 4.4), through the optax-style factory `bayes.hard_prior`;
* `curvature_apply`: the supernet logits every curvature estimator differentiates.

`step_fns(key)` binds them to what they close over and jits them. That is exactly the fields of
the hashable `StepKey` (built by `StepKey.create` from a config, the class count, the alive mask
and the mesh), so the compile cache (`functools.lru_cache` on `step_fns`) is keyed on what the
functions close over and nothing else: two runs that differ elsewhere (iterations, logging) share
the compiled functions in one process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bnas_jax import bayes
from bnas_jax import curvature as curvature_lib
from bnas_jax import phases
from bnas_jax import xla_flags
from bnas_jax.models import layers
from bnas_jax.search_space import spaces


# --------------------------------------------------------------------------------------------------
# Model and state.


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 alive: spaces.FrozenMask | None = None):
  """The supernet of `config` with static mask `alive` (None = all ops)."""
  return _create_model(config.space, _model_options(config), num_classes, alive)


def _model_options(config) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted(config.model.to_dict().items()))


def _create_model(space: str, model_options, num_classes: int, alive):
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  kwargs = dict(model_options)
  init_channels, num_cells = kwargs.pop("init_channels"), kwargs.pop("num_cells")
  return supernet.create_supernet(space, init_channels=init_channels, num_cells=num_cells,
                                  num_classes=num_classes, alive=alive, **kwargs)


def cell_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """``{cell type: number of cells}`` of the supernet of `config`."""
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  return dict(supernet.cell_counts(config.space, config.model.num_cells))


def optimizers(config: ml_collections.ConfigDict):
  """``(tx_w, tx_s)``: SGD with momentum for the weights (PyTorch's weight decay, added to the
  gradient before momentum) and for the switches (no decay, pruned switches masked)."""
  s = config.search
  tx_w = optax.chain(optax.add_decayed_weights(float(s.weight_decay)),
                     optax.sgd(float(s.lr), momentum=float(s.momentum)))
  tx_s = optax.chain(optax.sgd(float(s.switch_lr), momentum=float(s.switch_momentum)),
                     bayes.mask_updates())
  return tx_w, tx_s


def init_key(seed: int) -> jax.Array:
  """The key of `init_state`. RBG keys: the initialisers compile in seconds, whereas threefry's
  unrolled bit generator makes XLA:CPU spend minutes on a supernet's many initialisers. The
  stored ``rng`` (curvature keys) is the threefry key data of the same seed."""
  return jax.random.key(seed, impl="rbg")


def init_state(config: ml_collections.ConfigDict, num_classes: int,
               switch_shapes: Mapping[str, tuple[int, ...]], key: jax.Array,
               image_shape: tuple[int, int, int] = (32, 32, 3)) -> dict[str, Any]:
  """The full search state (pure; jit it with replicated out_shardings) for images of
  ``image_shape`` ``(H, W, C)`` (the parameters depend on C only).

  Returns:
    ``{'params', 'batch_stats', 'switches' {tau: f32[n, E, K]} (ones), 'opt_w', 'opt_s',
    'prior' (bayes.HardPriorState), 'rng' u32[2] (key data of `key`), 'step' i32[]}``.
  """
  model = create_model(config, num_classes)
  k_init, k_prior = jax.random.split(key)
  switches = {t: jnp.ones(s, jnp.float32) for t, s in switch_shapes.items()}
  images = jnp.zeros((2, *image_shape), jnp.float32)
  variables = model.init(k_init, images, switches, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx_w, tx_s = optimizers(config)
  prior = bayes.init(switches, key=k_prior, random_init=bool(config.bayes.random_init),
                     gamma_init=float(config.bayes.gamma_init),
                     omega_init=float(config.bayes.omega_init))
  return {"params": params, "batch_stats": batch_stats, "switches": switches,
          "opt_w": tx_w.init(params), "opt_s": tx_s.init(switches), "prior": prior,
          "rng": jax.random.key_data(jax.random.key(int(config.seed))),
          "step": jnp.zeros((), jnp.int32)}


def new_train_acc() -> dict[str, np.ndarray]:
  """Device-side running sums of a training stage, fetched every ``log_every_steps``."""
  z = lambda: np.zeros((), np.float32)  # distinct buffers: the accumulator is donated
  return {"loss": z(), "nll": z(), "penalty": z(), "correct": z(), "count": z(), "steps": z(),
          "grad_norm": z(), "switch_grad_norm": z(), "nonfinite": np.zeros((), np.int32),
          "first_bad_step": np.full((), -1, np.int32)}


def new_eval_acc() -> dict[str, np.ndarray]:
  """Running sums of `eval_step`: ``{'nll', 'correct', 'count'}``."""
  return {k: np.zeros((), np.float32) for k in ("nll", "correct", "count")}


# --------------------------------------------------------------------------------------------------
# The pure step functions.


def _merge_collection(old, new):
  """``old`` with the entries of ``new`` replaced (modules skipped by the mask keep theirs)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(old))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(new)))
  return flax.traverse_util.unflatten_dict(flat)


def _nll_and_correct(logits, labels, weights=None):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if weights is not None:
    nll, correct = nll * weights, correct * weights
  return nll, correct


def train_step(state, acc, batch, update_switches, *, model, tx_w, tx_s, lambda_origin: float,
               lambda_op: float, proximal: bool, prox_step: float):
  """One SGD step; `update_switches` (bool[], traced) selects the stage at run time.

  False = the warm-up step (spec 5 step 1): the switches stay at 1 and are not updated, their
  optimizer state is kept, the logged loss is the NLL. True = the search step (spec 5 step 2):
  mean NLL + the reweighted group-l1 penalty `bayes.penalty` (subgradient mode) or NLL followed
  by the group soft-threshold `bayes.prox_group_l1` with step `prox_step` (proximal mode); weights
  and switches updated, pruned switches exactly 0. One compiled program serves both stages.

  Args:
    state: the search state (`init_state`).
    acc: the running sums (`new_train_acc`).
    batch: ``{'image': f32[B, H, W, C], 'label': i32[B]}``.
    update_switches: bool[].
    model: the supernet; tx_w, tx_s: `optimizers`; lambda_origin, lambda_op: the penalty's
      lambdas; proximal: the penalty mode; prox_step: the proximal step size.

  Returns:
    ``(new state, new sums)``.
  """
  prior = state["prior"]

  def loss_fn(params, switches):
    logits, mutated = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                  batch["image"], switches, train=True, mutable=["batch_stats"])
    nll, correct = _nll_and_correct(logits, batch["label"])
    nll = jnp.mean(nll)
    pen = (jnp.zeros(()) if proximal
           else bayes.penalty(switches, prior, lambda_origin, lambda_op))
    return nll + pen, (nll, pen, mutated.get("batch_stats", {}), jnp.sum(correct))

  (_, (nll, pen, new_bs, correct)), (g_w, g_s) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state["params"], state["switches"])
  # A pruned switch's gradient: 0 where the model skips or masks pruned ops; with
  # ``model.pruned_ops='zero'`` (pruned ops computed, their switch 0) <grad, op output>, set to 0
  # here so that every formulation has the same switch momentum and gradient norm.
  g_s = bayes.apply_mask(g_s, prior.alive)
  upd_w, opt_w = tx_w.update(g_w, state["opt_w"], state["params"])
  upd_s, opt_s = tx_s.update(g_s, state["opt_s"], state["switches"], alive=prior.alive)
  switches = optax.apply_updates(state["switches"], upd_s)
  if proximal:
    switches = bayes.prox_group_l1(switches, prior, lambda_origin, lambda_op, prox_step)
    pen = bayes.penalty(switches, prior, lambda_origin, lambda_op)
  switches = bayes.apply_mask(switches, prior.alive)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update_switches, n, o), new, old)
  switches, opt_s = keep(switches, state["switches"]), keep(opt_s, state["opt_s"])
  pen = jnp.where(update_switches, pen, 0.0)
  new = dict(state, params=optax.apply_updates(state["params"], upd_w), opt_w=opt_w,
             switches=switches, opt_s=opt_s,
             batch_stats=_merge_collection(state["batch_stats"], new_bs), step=state["step"] + 1)
  grad_norm = optax.tree.norm(g_w)
  switch_grad_norm = jnp.where(update_switches, optax.tree.norm(g_s), 0.0)
  loss = nll + pen
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(switch_grad_norm)
  acc = {"loss": acc["loss"] + loss, "nll": acc["nll"] + nll, "penalty": acc["penalty"] + pen,
         "correct": acc["correct"] + correct,
         "count": acc["count"] + float(batch["label"].shape[0]), "steps": acc["steps"] + 1.0,
         "grad_norm": acc["grad_norm"] + grad_norm,
         "switch_grad_norm": acc["switch_grad_norm"] + switch_grad_norm,
         "nonfinite": acc["nonfinite"] + (~finite).astype(jnp.int32),
         "first_bad_step": jnp.where((acc["first_bad_step"] < 0) & ~finite, state["step"],
                                     acc["first_bad_step"])}
  return new, acc


def eval_step(state, acc, batch, *, model, batch_bn: bool):
  """Adds the supernet's summed NLL, correct predictions and example count on `batch` (weighted
  by its ``'mask'`` when present) to `acc`; ``batch_bn``: train-mode batch norm with this batch's
  statistics (``search.eval_bn='batch'``), else the running averages."""
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  if batch_bn:
    logits, _ = model.apply(variables, batch["image"], state["switches"], train=True,
                            mutable=["batch_stats"])
  else:
    logits = model.apply(variables, batch["image"], state["switches"], train=False)
  weights = batch.get("mask")
  if weights is None:
    weights = jnp.ones(batch["label"].shape, jnp.float32)
  nll, correct = _nll_and_correct(logits, batch["label"], weights)
  return {"nll": acc["nll"] + jnp.sum(nll), "correct": acc["correct"] + jnp.sum(correct),
          "count": acc["count"] + jnp.sum(weights)}


def prior_update(prior, switches, h, *, hard_prior: bayes.HardPrior):
  """`bayes.update` (gamma, omega, C, pruning; spec 4.2) with the scaled curvature `h`, then the
  switches with pruned groups set exactly to 0, through the factory `bayes.hard_prior`.

  Returns:
    ``(new prior, new switches)``.
  """
  # The curvature of pruned groups is 0 where the model skips or masks pruned ops; with
  # ``model.pruned_ops='zero'`` it is not, and is set to 0 so that every formulation updates alike.
  h = bayes.apply_mask(h, prior.alive)
  switches, prior = hard_prior.update(h, prior, switches)
  return prior, switches


def curvature_apply(model, variables, switches, images):
  """Supernet logits ``f32[B, classes]`` for the curvature pass (``apply_fn`` of the estimators).

  Train-mode batch norm with this batch's statistics, held fixed under differentiation
  (`layers.frozen_batch_stats`): the loss whose Laplace curvature every ``curvature.kind``
  estimates (``bnas_jax.curvature`` module docstring). Updated running statistics are discarded.

  Args:
    model: the `Supernet`.
    variables: ``{'params', 'batch_stats'}``.
    switches: ``{tau: f32[n, E, K]}`` (or with a leading per-example axis, for the per-example
      estimators).
    images: ``f32[B, H, W, C]``.
  """
  with layers.frozen_batch_stats():
    logits, _ = model.apply(variables, images, switches, train=True, mutable=["batch_stats"])
  return logits


# --------------------------------------------------------------------------------------------------
# The compiled step functions.


@dataclasses.dataclass(frozen=True)
class StepKey:
  """Everything the compiled step functions close over (hashable: the compile cache key).

  `step_fns` reads nothing else, so a value that enters the functions cannot be missing here.
  """
  space: str
  model_options: tuple[tuple[str, Any], ...]  # config.model, sorted items
  num_classes: int
  alive: spaces.FrozenMask | None  # None: the full supernet
  mesh: jax.sharding.Mesh
  optimizer: tuple[float, float, float, float, float]  # lr, momentum, wd, switch lr, switch mom.
  lambda_origin: float
  lambda_op: float
  proximal: bool
  eval_batch_bn: bool
  prune: tuple[tuple[str, Any], ...]  # bayes.update's keywords
  curvature_kind: str
  curvature_chunk_size: int
  curvature_cpu_opt_level: int  # XLA:CPU backend level of the curvature pass

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, num_classes: int,
             alive: Mapping[str, np.ndarray] | None, mesh: jax.sharding.Mesh) -> "StepKey":
    """The key of `config`'s step functions for mask `alive` (all-alive: the full supernet)."""
    frozen = None if alive is None else spaces.freeze_mask(alive)
    if frozen is not None and all(all(row) for _, rows in frozen for row in rows):
      frozen = None  # the full supernet: share the warm-up compilation
    if config.model.get("pruned_ops", "skip") == "zero":
      frozen = None  # the mask is not part of the program: every mask shares the full one
    s, b = config.search, config.bayes
    return cls(
        space=config.space, model_options=_model_options(config), num_classes=int(num_classes),
        alive=frozen, mesh=mesh,
        optimizer=(float(s.lr), float(s.momentum), float(s.weight_decay), float(s.switch_lr),
                   float(s.switch_momentum)),
        lambda_origin=float(b.lambda_origin), lambda_op=float(b.lambda_op),
        proximal=s.penalty_mode == "proximal", eval_batch_bn=s.eval_bn == "batch",
        prune=(("prune_threshold", float(b.prune_threshold)), ("prune_mode", str(b.prune_mode)),
               ("eps_omega", float(b.eps_omega)), ("fidelity", bool(b.fidelity))),
        curvature_kind=str(config.curvature.kind),
        curvature_chunk_size=int(config.curvature.chunk_size),
        curvature_cpu_opt_level=int(config.curvature.get("cpu_opt_level", 3)))

  def describe(self) -> str:
    """What is compiled, for the compile log lines."""
    if self.alive is None:
      return "full supernet"
    live = sum(v for _, rows in self.alive for row in rows for v in row)
    total = sum(len(row) for _, rows in self.alive for row in rows)
    return f"pruned supernet, {live} of {total} op groups live"


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted functions of one `StepKey` (compiled once, reused for every epoch).

  `warmup_step` and `search_step` are `train_step` with its stage flag bound (one program).
  """
  train_step: Callable
  warmup_step: Callable
  search_step: Callable
  eval_step: Callable
  curvature_fn: Callable
  prior_update: Callable


@functools.lru_cache(maxsize=8)
def step_fns(key: StepKey) -> StepFns:
  """`train_step`, `eval_step`, the curvature estimator and `prior_update` bound to `key` and
  jitted (state replicated over ``key.mesh``; the train step donates its state and sums). Each
  compilation is logged (`phases.LoggedJit`)."""
  model = _create_model(key.space, key.model_options, key.num_classes, key.alive)
  lr, momentum, wd, switch_lr, switch_momentum = key.optimizer
  tx_w = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum))
  tx_s = optax.chain(optax.sgd(switch_lr, momentum=switch_momentum), bayes.mask_updates())
  # The group soft-threshold after a momentum-mu SGD step: momentum amplifies a steady gradient,
  # the subgradient mode's penalty gradient included, by 1/(1 - mu); the proximal step uses the
  # same effective step size lr/(1 - mu), so both modes shrink the switches alike at one lambda.
  train = functools.partial(train_step, model=model, tx_w=tx_w, tx_s=tx_s,
                            lambda_origin=key.lambda_origin, lambda_op=key.lambda_op,
                            proximal=key.proximal, prox_step=switch_lr / (1.0 - switch_momentum))
  evaluate = functools.partial(eval_step, model=model, batch_bn=key.eval_batch_bn)
  update = functools.partial(prior_update, hard_prior=bayes.hard_prior(
      lambda_origin=key.lambda_origin, lambda_op=key.lambda_op,
      cells=spaces.get_space(key.space).cells, **dict(key.prune)))
  # 'shift_vjp' depthwise convs have a custom VJP and no forward mode: the curvature kinds that
  # use jvp / linearize get the same network with plain 'shift' convs (identical values).
  curv_model = model
  if (getattr(model, "dw_impl", "shift") == "shift_vjp"
      and key.curvature_kind not in curvature_lib.REVERSE_MODE_KINDS):
    curv_model = model.clone(dw_impl="shift")
  opts = {"chunk_size": key.curvature_chunk_size} if key.curvature_chunk_size > 0 else {}
  curvature = curvature_lib.make_curvature_fn(
      key.curvature_kind, functools.partial(curvature_apply, curv_model), jit=False, **opts)
  # `curvature.cpu_opt_level` (`xla_flags.curvature_compiler_options`).
  curvature_fn = jax.jit(curvature, compiler_options=xla_flags.curvature_compiler_options(
      key.curvature_cpu_opt_level, key.mesh.devices.flat[0].platform))

  replicated = NamedSharding(key.mesh, P())
  logged = functools.partial(phases.LoggedJit, detail=key.describe(), program=repr(
      (key.space, key.model_options, key.num_classes, key.alive, key.optimizer,
       key.lambda_origin, key.lambda_op, key.proximal, key.eval_batch_bn, key.prune,
       key.curvature_kind, key.curvature_chunk_size, key.curvature_cpu_opt_level)))
  train_fn = logged(jax.jit(train, donate_argnums=(0, 1), out_shardings=(replicated, replicated)),
                    "train step")
  return StepFns(
      train_step=train_fn,
      warmup_step=lambda state, acc, batch: train_fn(state, acc, batch, False),
      search_step=lambda state, acc, batch: train_fn(state, acc, batch, True),
      eval_step=logged(jax.jit(evaluate, donate_argnums=(1,), out_shardings=replicated),
                       "eval step"),
      curvature_fn=logged(curvature_fn, f"curvature pass ({key.curvature_kind})"),
      prior_update=logged(jax.jit(update, out_shardings=replicated), "prior update"))
