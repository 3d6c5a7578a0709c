"""Pure step functions and the BayesNAS outer loop of network compression (compression spec 3).

Everything numeric here is a pure function of its arguments; the step functions are jitted once per
`StepConfig` (static) and network. The HARD-prior state, its update, the penalty, the proximal step
and the masks are `bnas_jax.bayes` (with the layout of `bnas_jax.compression.groups`); the
curvature is `bnas_jax.curvature` (``ggn_fast``: exact GGN diagonal here, since examples do not
interact in eval mode). Nothing is copied from them.

The objective of the compression stage (spec 3.1) for switches ``s`` and weights ``theta``:

  ``E_D(theta, s) + lambda sum_g omega_g |s_g| + (wd / 2) ||theta||^2``

with ``E_D`` the mean softmax cross-entropy of the mini-batch, weight decay on the kernels and on
the batch-norm scales (spec 3.4: it breaks the switch/weight scale symmetry), none on switches.
One outer iteration (spec 3.2): ``epochs_per_iteration`` epochs of training with omega fixed,
then the curvature ``h`` = GGN diagonal of the mean loss w.r.t. the live switches averaged over
``curvature_batches`` batches in eval mode (dead switches are masked inside the network, so their
``h`` is exactly 0 and their omega is clamped to eps by `bayes.update`), then `bayes.update` with
``H = h / lambda`` (spec 3.4 units: ``h`` is the curvature of the same mean loss the penalty is
added to, so ``lambda`` plays the role of the likelihood temperature), pruning of groups whose
gamma fell below ``prune_threshold`` times the layer's median live gamma or whose ``|s|`` fell
below ``eps_s`` (and, with ``prune_rule='posterior'``, whose Laplace posterior does not exclude 0
at one standard deviation, `prior_step`), and the hierarchy (children of a dead channel die, a
channel without live children dies).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnas_jax import bayes
from bnas_jax import curvature as curvature_lib
from bnas_jax.compression import groups
from bnas_jax.compression import networks
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import pipeline

Array = jax.Array
PENALTY_MODES = ("subgradient", "proximal")
SWITCH_OPTIMIZERS = ("adam", "sgd")


# -------------------------------------------------------------------------------------------------
# Data (host arrays; batches are gathered by a seeded permutation per epoch).


@dataclasses.dataclass(frozen=True)
class Data:
  """A train / val / test split on the host.

  Attributes:
    train_x, val_x, test_x: u8[N, H, W, C] images.
    train_y, val_y, test_y: i32[N] labels.
    mean: f32[H, W, C] mean image (``'mean_image'``) or f32[C] channel mean in [0, 1] units.
    std: f32[C] channel std (``'channel'``) or ones.
    augment: pad-4 crop + flip on training batches (CIFAR, spec 1.4).
  """
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  augment: bool = False


def make_data(dataset: dataset_lib.Dataset, num_val: int, seed: int, *,
              normalisation: str = "mean_image", augment: bool = False) -> Data:
  """Splits a `Dataset`'s training part into train / val (seeded) and sets the normalisation.

  Args:
    dataset: the loaded data set.
    num_val: validation images held out of the training part (selection data, spec 4.1).
    seed: split seed.
    normalisation: ``'mean_image'`` (MNIST: /255 minus the training mean image, spec 1.4) or
      ``'channel'`` (CIFAR: per-channel mean / std).
    augment: pad-4 crop + flip for training batches.

  Raises:
    ValueError: a bad `normalisation` or `num_val` not leaving training data.
  """
  n = len(dataset.train_labels)
  if not 0 < num_val < n:
    raise ValueError(f"num_val={num_val} must be in (0, {n}) (the training images of "
                     f"{dataset.source})")
  split = pipeline.split_train(n, {"train": n - num_val, "val": num_val}, seed)
  tr, va = split["train"], split["val"]
  train_x = dataset.train_images[tr]
  if normalisation == "mean_image":
    mean = train_x.astype(np.float32).mean(axis=0) / 255.0
    std = np.ones((train_x.shape[-1],), np.float32)
  elif normalisation == "channel":
    mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
  else:
    raise ValueError(f"normalisation must be 'mean_image' or 'channel', got {normalisation!r}")
  return Data(train_x, dataset.train_labels[tr], dataset.train_images[va],
              dataset.train_labels[va], dataset.test_images, dataset.test_labels,
              mean.astype(np.float32), std.astype(np.float32), augment)


def preprocess(images: Array, mean: Array, std: Array, key: Array | None = None) -> Array:
  """u8[B, H, W, C] -> f32[B, H, W, C] ``(x / 255 - mean) / std``; crop + flip when `key`."""
  x = jnp.asarray(images)
  if key is not None:
    k_crop, k_flip = jax.random.split(key)
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    off = jax.random.randint(k_crop, (b, 2), 0, 9)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, off)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  return (x.astype(jnp.float32) / 255.0 - mean) / std


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
  """Index batches of one epoch (seeded permutation, last partial batch dropped)."""
  perm = pipeline.epoch_permutation(n, seed, epoch)
  steps = max(1, n // batch_size)
  return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# -------------------------------------------------------------------------------------------------
# State and step functions.


class TrainState(NamedTuple):
  """Everything a training step changes (a pytree; checkpointed as is)."""
  params: Any
  batch_stats: Any
  switches: dict[str, Array]  # {tau: f32[1, E, K]}; {} when the switches are not trained
  opt_w: Any
  opt_s: Any
  step: Array  # i32[]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static hyper-parameters of the step functions (hashable).

  Attributes:
    lr: weight learning rate (Adam).
    weight_decay: L2 coefficient on kernels and batch-norm scales.
    switch_optimizer: ``'adam'`` (spec 3.2 default: the network's optimiser with 10x its lr;
      per-switch step sizes, so switches of very different curvature move at one speed) or
      ``'sgd'`` (with momentum, as BayesNAS's search).
    switch_lr: switch learning rate.
    switch_momentum: momentum of the switch SGD.
    penalty_mode: ``'subgradient'`` (the penalty's gradient goes through the switch optimiser)
      or ``'proximal'`` (SGD only: soft-threshold after the switch step, exact zeros; the step is
      the momentum-effective ``switch_lr / (1 - switch_momentum)``).
    train_bn: batch norm with batch statistics in training (pretraining); False freezes it.
    dropout: dropout on in training (pretraining).
  """
  lr: float = 1e-3
  weight_decay: float = 0.0
  switch_optimizer: str = "adam"
  switch_lr: float = 1e-2
  switch_momentum: float = 0.9
  penalty_mode: str = "subgradient"
  train_bn: bool = True
  dropout: bool = True


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: getattr(p[-1], "key", None) in ("kernel", "scale"), params)


def weight_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  """Adam on the weights with L2 ``weight_decay`` (added to the gradient) on kernels and BN scales."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
                     optax.adam(cfg.lr))


def switch_optimizer(cfg: StepConfig) -> optax.GradientTransformationExtraArgs:
  """Adam or SGD with momentum on the switches; updates of dead groups zeroed last
  (`bayes.mask_updates`)."""
  if cfg.switch_optimizer == "adam":
    base = optax.adam(cfg.switch_lr)
  else:
    base = optax.sgd(cfg.switch_lr, momentum=cfg.switch_momentum)
  return optax.chain(base, bayes.mask_updates())


def init_state(variables: Mapping[str, Any], switches: Mapping[str, Array] | None,
               cfg: StepConfig) -> TrainState:
  """A fresh `TrainState` (optimiser states at zero)."""
  params = variables["params"]
  sw = dict(switches or {})
  return TrainState(params=params, batch_stats=variables.get("batch_stats", {}), switches=sw,
                    opt_w=weight_optimizer(cfg).init(params),
                    opt_s=switch_optimizer(cfg).init(sw) if sw else (),
                    step=jnp.zeros((), jnp.int32))


def _masked(switches, alive):
  # alive {tau: bool[E, K]} broadcasts against [1, E, K] and per-example [B, 1, E, K].
  return {tau: jnp.where(jnp.asarray(alive[tau]), s, jnp.zeros_like(s))
          for tau, s in switches.items()}


def _ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@functools.lru_cache(maxsize=32)
def make_step_fns(arch: networks.Arch, cfg: StepConfig):
  """``(train_step, eval_step)`` for `arch`, jitted (cached per `arch` and `cfg`).

  ``train_step(state, images u8[B,H,W,C], labels i32[B], key, mean, std, omega, alive, lam,
  augment) -> (state, metrics)``: one step on ``E_D + penalty`` (the penalty and switch update
  only when ``state.switches`` is non-empty; ``omega``/``alive`` are the prior's trees,
  ``lam`` f32[] the current lambda, 0 = no penalty).

  ``eval_step(params, batch_stats, switches, alive, images, labels, mean, std) -> (sum CE,
  correct)`` in eval mode (running batch statistics, no dropout), switches masked by ``alive``.
  """
  if cfg.penalty_mode not in PENALTY_MODES:
    raise ValueError(f"penalty_mode must be one of {PENALTY_MODES}, got {cfg.penalty_mode!r}")
  if cfg.switch_optimizer not in SWITCH_OPTIMIZERS:
    raise ValueError(f"switch_optimizer must be one of {SWITCH_OPTIMIZERS}, got "
                     f"{cfg.switch_optimizer!r}")
  if cfg.penalty_mode == "proximal" and cfg.switch_optimizer != "sgd":
    raise ValueError("penalty_mode='proximal' needs switch_optimizer='sgd' (the soft-threshold "
                     "step of Adam's per-switch steps is not defined); use 'subgradient'")
  model = networks.CompressNet(arch)
  tx_w, tx_s = weight_optimizer(cfg), switch_optimizer(cfg)
  prox_step = cfg.switch_lr / (1.0 - cfg.switch_momentum)
  has_bn = arch.batch_norm

  def forward(params, batch_stats, switches, x, key, train):
    unit = groups.unit_switches(arch, switches) if switches else None
    variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
    train_bn = train and cfg.train_bn and has_bn
    if train_bn:
      logits, upd = model.apply(variables, x, unit, train=train and cfg.dropout, train_bn=True,
                                rngs={"dropout": key}, mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    logits = model.apply(variables, x, unit, train=train and cfg.dropout, train_bn=False,
                         rngs={"dropout": key})
    return logits, batch_stats

  @functools.partial(jax.jit, static_argnames=("augment",))
  def train_step(state: TrainState, images, labels, key, mean, std, omega, alive, lam,
                 augment: bool = False):
    k_aug, k_drop = jax.random.split(key)
    x = preprocess(images, mean, std, k_aug if augment else None)
    has_sw = bool(state.switches)
    proximal = cfg.penalty_mode == "proximal"

    def loss_fn(params, switches):
      sw = _masked(switches, alive) if has_sw else switches
      logits, new_stats = forward(params, state.batch_stats, sw, x, k_drop, True)
      data = _ce(logits, labels)
      pen = jnp.zeros(())
      if has_sw and not proximal:
        pen = lam * bayes.penalty(switches, omega, 1.0, 1.0, alive=alive)
      return data + pen, (data, pen, logits, new_stats)

    (loss, (data, pen, logits, new_stats)), (g_w, g_s) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.switches)
    upd_w, opt_w = tx_w.update(g_w, state.opt_w, state.params)
    params = optax.apply_updates(state.params, upd_w)
    switches, opt_s = state.switches, state.opt_s
    if has_sw:
      upd_s, opt_s = tx_s.update(g_s, state.opt_s, state.switches, alive=alive)
      switches = optax.apply_updates(state.switches, upd_s)
      if proximal:
        switches = bayes.prox_group_l1(switches, omega, lam, lam, prox_step, alive=alive)
      switches = bayes.apply_mask(switches, alive)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    new = TrainState(params, new_stats, switches, opt_w, opt_s, state.step + 1)
    return new, {"loss": loss, "data_loss": data, "penalty": pen, "accuracy": acc}

  @jax.jit
  def eval_step(params, batch_stats, switches, alive, images, labels, mean, std):
    x = preprocess(images, mean, std)
    sw = _masked(switches, alive) if switches else switches
    logits, _ = forward(params, batch_stats, sw, x, jax.random.key(0), False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(nll), jnp.sum(jnp.argmax(logits, -1) == labels)

  return train_step, eval_step


def curvature_apply_fn(arch: networks.Arch):
  """``apply_fn(variables, switches, images) -> logits`` in the form `bnas_jax.curvature` wants.

  ``variables = {'params', 'batch_stats', 'alive', 'mean', 'std'}``; images u8[B, H, W, C];
  switches ``{tau: f32[1, E, K]}`` or per example ``[B, 1, E, K]``. Dead switches (``alive``
  False) are replaced by 0 inside, so the curvature of a dead switch is exactly 0. Eval mode.
  """
  model = networks.CompressNet(arch)

  def apply_fn(variables, switches, images):
    x = preprocess(images, variables["mean"], variables["std"])
    sw = _masked(switches, variables["alive"])
    net_vars = {"params": variables["params"]}
    if arch.batch_norm:
      net_vars["batch_stats"] = variables["batch_stats"]
    return model.apply(net_vars, x, groups.unit_switches(arch, sw), train=False)

  return apply_fn


@functools.lru_cache(maxsize=8)
def make_curvature_fn(arch: networks.Arch, kind: str = "ggn_fast"):
  """Jitted ``(switches, variables, batch, key) -> h`` (`bnas_jax.curvature.make_curvature_fn`)."""
  return curvature_lib.make_curvature_fn(kind, curvature_apply_fn(arch))


# -------------------------------------------------------------------------------------------------
# Loops (host side: batches, epochs).


def evaluate(eval_step, state: TrainState, alive, images: np.ndarray, labels: np.ndarray,
             data: Data, batch_size: int = 1000) -> dict[str, float]:
  """``{'error' (percent), 'loss' (mean CE)}`` of the masked network on a whole split."""
  tot_nll = tot_correct = 0.0
  for i in range(0, len(labels), batch_size):
    nll, correct = eval_step(state.params, state.batch_stats, state.switches, alive,
                             images[i:i + batch_size], labels[i:i + batch_size], data.mean,
                             data.std)
    tot_nll += float(nll)
    tot_correct += float(correct)
  n = max(len(labels), 1)
  return {"error": 100.0 * (1.0 - tot_correct / n), "loss": tot_nll / n}


def train_epoch(train_step, state: TrainState, data: Data, *, batch_size: int, seed: int,
                epoch: int, omega=None, alive=None, lam: float = 0.0) -> tuple[TrainState, dict]:
  """One epoch over ``data.train_x`` in the seeded order of (`seed`, `epoch`).

  Returns the new state and the epoch's mean metrics (python floats).
  """
  omega = omega if omega is not None else {}
  alive = alive if alive is not None else {}
  sums: dict[str, float] = {}
  batches = epoch_batches(len(data.train_y), batch_size, seed, epoch)
  metrics = []
  for step, idx in enumerate(batches):
    key = pipeline.batch_key(seed, epoch, step)
    state, m = train_step(state, data.train_x[idx], data.train_y[idx], key, data.mean, data.std,
                          omega, alive, jnp.float32(lam), augment=data.augment)
    metrics.append(m)
  for m in jax.device_get(metrics):
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return state, {k: v / len(batches) for k, v in sums.items()}


def curvature(curv_fn, state: TrainState, alive, data: Data, *, batch_size: int,
              num_batches: int, seed: int, iteration: int) -> dict[str, Array]:
  """Mean GGN diagonal over `num_batches` training batches (`bnas_jax.curvature.accumulate`)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats, "alive": alive,
               "mean": data.mean, "std": data.std}
  idx = epoch_batches(len(data.train_y), batch_size, seed ^ 0xC0A7, iteration)[:num_batches]
  batches = [{"image": data.train_x[i], "label": data.train_y[i]} for i in idx]
  return curvature_lib.accumulate(curv_fn, state.switches, variables, batches)


def lambda_at(iteration: int, total: int, lam: float, ramp_fraction: float) -> float:
  """lambda of outer iteration ``iteration`` (1-based): linear ramp over the first
  ``ceil(ramp_fraction * total)`` iterations (never 0), then `lam` (spec 3.2 defaults)."""
  ramp = int(np.ceil(ramp_fraction * total))
  return float(lam) * (min(1.0, iteration / ramp) if ramp > 0 else 1.0)


PRUNE_RULES = ("gamma", "posterior")


def _hierarchy(alive: Mapping[str, Array]) -> dict[str, Array]:
  """The hierarchy rule of `bayes.update` on a group mask: a parent (column 0) without live
  children dies, a dead parent kills its children."""
  out = {}
  for tau, a in alive.items():
    a = jnp.asarray(a, bool)
    origin = a[:, 0] & (jnp.any(a[:, 1:], axis=1) if a.shape[1] > 1 else True)
    out[tau] = jnp.concatenate([origin[:, None], a[:, 1:] & origin[:, None]], axis=1)
  return out


def prior_step(prior: bayes.HardPriorState, switches: Mapping[str, Array], h: Mapping[str, Array],
               *, lam: float, prune_threshold: float, eps_s: float, reweight: bool = True,
               prune_rule: str = "gamma",
               cost: Mapping[str, Array] | None = None) -> bayes.HardPriorState:
  """Spec 3.2 steps 3-4 with `bayes.update`: switches with ``|s| < eps_s`` die first, then the
  Laplace update, the relative gamma threshold (per layer and switch kind) and the hierarchy.

  ``prune_rule='posterior'`` also removes every live group whose Laplace posterior does not
  exclude 0 at one standard deviation, ``s_g^2 < C_g`` with ``C_g = (1/gamma_g + H_g)^-1`` the
  posterior variance `bayes.update` returns (SBP's "signal-to-noise ratio below 1" rule, spec 3.5,
  on the BayesNAS posterior). With ``gamma = |s| / omega`` it reads ``|s| omega + s^2 h / lambda
  < 1``: a unit dies when the data barely constrain it (small curvature ``h`` relative to
  ``lambda``), i.e. where the exact ARD solution sets its gamma to 0, instead of waiting for the
  optimiser to drive its switch below ``eps_s``.

  ``reweight=False`` (baseline B1, plain group lasso) keeps omega at 1 and prunes on ``|s|`` only.

  ``cost`` ``{tau: f32[E, K]}`` (positive; `groups.cost_weights`, ``compress.cost_weighting``):
  a per-group strength ``lambda_g = lambda m_g`` (a cost-aware penalty, as in FLOPs-aware L0 or
  cost-weighted group lasso), realised with the scalar-lambda `bayes.update` / `bayes.penalty`
  (spec 3.1 objective, spec 3.2 step 3 update, spec 3.4 units). Derivation, per group ``g``:

  * prior update: `bayes.update` only sees lambda through ``H_g = max(h_g, 0) / lambda_g``. With
    ``lambda_g = lambda m_g`` and ``m_g > 0``, ``max(h_g, 0) / (lambda m_g) = max(h_g / m_g, 0) /
    lambda``, so passing ``h / m`` with the scalar lambda gives the same ``H_g``, hence the same
    posterior variance ``C_g = gamma_g / (1 + gamma_g H_g)``, ``omega_g = max(sqrt(H_g / (1 +
    gamma_g H_g)), eps)``, ``gamma_g = ||S_g|| / omega_g`` (the children's in series with their
    parent's), the same relative gamma threshold and hierarchy, the same posterior rule
    ``s_g^2 < C_g`` (i.e. ``|s_g| omega_g + s_g^2 h_g / (lambda m_g) < 1``: a unit dies when its
    saliency per unit cost ``s_g^2 h_g / m_g`` is below about lambda) and the same stored
    ``curvature`` ``H``. This is done here;
  * penalty: ``sum_g lambda_g omega_g |s_g| = lambda sum_g (m_g omega_g) |s_g|``, so the scalar
    penalty with ``m omega`` in place of omega is exact (`sparsity_penalty_omega`), for BayesNAS
    and for plain group lasso (omega = 1: ``lambda sum_g m_g |s_g|``).

  Plain group lasso (``reweight=False``) uses no curvature, so `cost` only enters its penalty.
  """
  if prune_rule not in PRUNE_RULES:
    raise ValueError(f"prune_rule must be one of {PRUNE_RULES}, got {prune_rule!r}")
  small = {tau: jnp.abs(jnp.asarray(s))[0] >= eps_s for tau, s in switches.items()}
  alive = {tau: jnp.asarray(prior.alive[tau]) & small[tau] for tau in prior.alive}
  if not reweight:
    return prior._replace(alive=_hierarchy(alive), count=prior.count + 1)
  prior = prior._replace(alive=alive)
  if cost is not None:
    h = cost_scaled_curvature(h, cost)
  prior = bayes.update(prior, switches, h, lambda_origin=lam, lambda_op=lam,
                       prune_threshold=prune_threshold, prune_mode="relative")
  if prune_rule == "posterior":
    alive = {tau: a & ~(jnp.square(jnp.asarray(switches[tau]))[0]
                        < jnp.asarray(prior.posterior_variance[tau])[0])
             for tau, a in prior.alive.items()}
    alive = _hierarchy(alive)
    prior = prior._replace(alive=alive,
                           gamma={tau: jnp.where(alive[tau][None], g, 0.0)
                                  for tau, g in prior.gamma.items()})
  return prior


def cost_scaled_curvature(h: Mapping[str, Array], cost: Mapping[str, Array]) -> dict[str, Array]:
  """``h / m`` per group (``{tau: f32[1, E, K]}`` over ``{tau: f32[E, K]}``): the curvature that,
  with the scalar lambda, gives `bayes.update` the per-group ``lambda_g = lambda m_g``
  (`prior_step`)."""
  return {tau: jnp.asarray(v) / jnp.asarray(cost[tau], jnp.asarray(v).dtype)[None]
          for tau, v in h.items()}


def sparsity_penalty_omega(prior: bayes.HardPriorState, reweight: bool,
                           cost: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """omega used by the penalty: the prior's (BayesNAS) or all ones (plain group lasso, B1),
  times the group weights ``m`` when `cost` is given (``lambda sum_g m_g omega_g |s_g|``, the
  per-group ``lambda_g = lambda m_g`` of `prior_step`)."""
  omega = prior.omega if reweight else {tau: jnp.ones_like(w) for tau, w in prior.omega.items()}
  if cost is None:
    return omega
  return {tau: w * jnp.asarray(cost[tau], jnp.asarray(w).dtype) for tau, w in omega.items()}

