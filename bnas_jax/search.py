"""BayesNAS search runner: Algorithm 1 with T outer iterations (spec 4.4, 5, 11).

`run(config, workdir)` does, with all state checkpointed so a killed run resumes exactly:

1. ``search.warmup_epochs`` warm-up epochs on the network weights only (switches frozen at 1) on
   the ``'warmup'`` split (spec 5 step 1; cutout ``config.data.cutout``);
2. for t = 1..T (``search.iterations``):

   a. one epoch on weights and switches on the ``'search'`` split (spec 5 step 2): two SGD
      optimisers with momentum (weights: ``search.lr`` / ``search.weight_decay``; switches:
      ``search.switch_lr``, no weight decay), loss = mean NLL + the reweighted group-l1 penalty
      `bayes.penalty` (``search.penalty_mode='subgradient'``, as the original) or NLL followed by
      the group soft-threshold `bayes.prox_group_l1` (``'proximal'``); pruned switches stay
      exactly 0;
   b. a curvature pass: ``curvature.kind`` of `bnas_jax.curvature.CURVATURE_FNS` over
      ``curvature.num_batches`` batches of the search split, averaged (curvature of the *mean*
      loss), times ``bayes.curvature_scale`` (see below);
   c. `bayes.update` (gamma, omega, C, pruning), then the supernet is rebuilt with the new static
      ``alive`` mask (pruned ops cost no compute; the step functions are compiled once per mask);
   d. supernet accuracy on the ``'val'`` split (the test set is never used for decisions), and the
      iteration's genotype (`genotype.derive` with the group gammas as scores) written under
      ``<workdir>/iterations/tNN/``;
3. ``<workdir>/genotype.json`` + cell pictures, ``prior.npz`` and ``summary.json``.

Curvature units (spec 4.1, 4.3, 6.4). The epoch minimises ``E_D + sum_g lambda_k omega_g ||S_g||``
with ``E_D`` the *mean* NLL. Divided by lambda this is ``E_D / lambda + sum_g omega_g ||S_g||``: the
negative log of the likelihood tempered by ``1/lambda`` times the tangent-bounded HARD prior, whose
Laplace precision for a switch is ``1/gamma + h / lambda`` with ``h`` the curvature of the same
mean loss. So ``H = curvature_scale * h / lambda`` with ``bayes.curvature_scale = 1`` (the default)
is the precision consistent with the loss the switches are trained on; lambda is then the one
temperature shared by the penalty and the update. (The original's h was a *sum* over its last
18-image batch with quirky constants, spec 6.3, and its lambdas 0.005-0.01 were tuned against that;
``curvature_scale = 18`` with those lambdas mimics it, and puts ``gamma * H`` far above 1 where
gamma follows the switch size alone, see `bayes.calibration`, logged every iteration.)

Data parallelism: one `jax.jit`-ted step over a 1-D mesh of all devices (axis ``'data'``), the
batch sharded (``NamedSharding(mesh, P('data'))``) and the state replicated; XLA's SPMD partitioner
inserts the gradient all-reduce and computes train-mode batch-norm statistics over the *global*
batch, so any device count gives the single-device result (up to float reassociation).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bnas_jax import bayes
from bnas_jax import checkpointing
from bnas_jax import config_files
from bnas_jax import curvature as curvature_lib
from bnas_jax import errors
from bnas_jax import metrics as metrics_lib
from bnas_jax import phases
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import pipeline
from bnas_jax.data import readers
from bnas_jax.data import sharding as sharding_lib
from bnas_jax.models import layers
from bnas_jax.search_space import spaces

PHASE_WARMUP = "warmup"
PHASE_SEARCH = "search"
PHASE_UPDATE = "update"
PHASE_DONE = "done"

PENALTY_MODES = ("subgradient", "proximal")


class NonFiniteError(errors.NonFiniteError):
  """A non-finite loss, gradient or prior state stopped the run (the last good checkpoint stays)."""


# --------------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """All fields of a search config with the official proxy-search values (spec 5, 7.1).

  Experiment files (``experiments/*.py``) start from this and change what differs.
  """
  c = ml_collections.ConfigDict()
  c.mode = "search"
  c.seed = 0  # model init and curvature keys; config.data.seed follows it unless set
  c.distributed = False  # jax.distributed.initialize() in main (multi-host)
  c.space = "bayesnas"  # bnas_jax.search_space.spaces.get_space name

  c.model = ml_collections.ConfigDict()
  c.model.init_channels = 36  # C (spec 2.4: 36; DARTS search uses 16)
  c.model.num_cells = 8  # bayesnas/darts: cells; nb201: cells per stage (see create_supernet)
  # Depthwise convs (bnas_jax.models.layers.depthwise_conv): 'auto' = 'shift_vjp' on CPU (fastest
  # step and compile there) and 'lax' on GPU/TPU (fastest on an H200); 'shift' also supports
  # forward-mode AD. All compute the same function, so it may change when a run is resumed.
  c.model.dw_impl = "auto"
  # The edges of each cell (bnas_jax.models.supernet.Cell): 'scan' = one lax.scan per cell (fastest
  # compile), 'unroll' = the same loop unrolled (on CPU a faster step, a 2-5x slower compile). Same
  # function and parameters, so it may change when a run is resumed.
  c.model.edge_loop = "scan"
  # After pruning: 'skip' never computes a pruned op (one loop per target node and kept op set:
  # slower compiles of the pruned supernet), 'mask' runs the ops kept on any edge of a cell phase
  # in one loop and zeroes the pruned ones (compiles like the full supernet). Same results.
  c.model.pruned_ops = "skip"
  # Recompute each edge's forward pass in the backward pass instead of storing its activations
  # (jax.checkpoint): on CPU a 20-40 % faster step and a 12-17x smaller activation buffer; same
  # function and gradients, so it may change when a run is resumed.
  c.model.remat = True

  c.data = dataset_lib.get_config()  # name, source, data_dir, num_train, splits, seed, cutout
  c.data.seed = dataset_lib.follow(c, "seed")  # = c.seed unless overridden
  c.data.cutout = 16  # warm-up epochs only (spec 5); the search epochs use search.switch_cutout

  c.search = ml_collections.ConfigDict()
  c.search.warmup_epochs = 1
  c.search.iterations = 3  # T outer iterations (the original: 1)
  c.search.batch_size = 18  # global batch (spec 5)
  c.search.lr = 0.1  # weights, constant
  c.search.momentum = 0.9
  c.search.weight_decay = 1e-4
  c.search.switch_lr = 0.1
  c.search.switch_momentum = 0.9
  c.search.switch_cutout = 0  # the original's switch epoch: crop + flip, no cutout
  c.search.penalty_mode = "subgradient"  # or 'proximal'
  c.search.max_steps_per_epoch = -1  # > 0 caps every epoch (smoke tests); -1 = full epochs
  c.search.eval_batch_size = 200
  # Supernet evaluation: 'batch' = train-mode batch norm with the statistics of each eval batch
  # (robust right after pruning, when the running averages still describe the unpruned network);
  # 'running' = the running averages (what the original's model.eval() used).
  c.search.eval_bn = "batch"
  c.search.max_eval_examples = -1  # > 0 evaluates on the first N val examples only
  # Compile the evaluation / curvature (and, after pruning, the next train step) in background
  # threads while the main thread compiles or trains (results unchanged). Off: on this 2-core CPU
  # it made a short cifar_proxy:cpu search slower (225 s against 192 s; XLA:CPU already compiles
  # on both cores). Meant for many-core hosts, e.g. a GPU machine's (not measured there yet).
  c.search.compile_ahead = False

  c.bayes = ml_collections.ConfigDict()
  c.bayes.lambda_origin = 0.01
  c.bayes.lambda_op = 0.01
  # H = curvature_scale * h / lambda with h the curvature of the mean loss: 1 is the precision of
  # the loss the switches are trained on (module docstring); -1 = search.batch_size, the original's
  # sum-over-batch units.
  c.bayes.curvature_scale = 1.0
  c.bayes.prune_threshold = 1e-3
  c.bayes.prune_mode = "relative"  # 'absolute' | 'relative' (to the largest live gamma of the same
  # switch kind, origin or op, per cell type)
  c.bayes.random_init = False  # True: U(0, 1) gamma/omega as the original (spec 4.2)
  c.bayes.gamma_init = 1.0
  c.bayes.omega_init = 1.0
  c.bayes.eps_omega = bayes.EPS_OMEGA
  c.bayes.fidelity = False  # the original's gamma* quirk (spec 4.2 step 3)

  c.genotype = ml_collections.ConfigDict()
  # > 0: the exported genotype keeps at most this many surviving ops per cell, taken greedily by
  # gamma among ops whose source is connected (genotype.derive max_ops; the released BayesNAS
  # cells have 8-13). 0: every op whose group survived the gamma threshold. bayesnas/darts only.
  c.genotype.max_ops = 0

  c.curvature = ml_collections.ConfigDict()
  c.curvature.kind = curvature_lib.DEFAULT_CURVATURE
  c.curvature.num_batches = 10  # M (spec 6.4 suggests 10-50; the original used 1)
  c.curvature.batch_size = -1  # -1: = search.batch_size
  c.curvature.chunk_size = -1  # > 0: passes per vectorised call (memory); -1: estimator default

  c.nb201 = ml_collections.ConfigDict()
  c.nb201.table = ml_collections.config_dict.placeholder(str)  # None: bnas_jax.nb201 default
  c.nb201.dataset = "cifar10"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # plus at every epoch end and after every prior update
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = False

  c.log_every_steps = 50  # metrics fetched from the device (and finiteness checked) this often
  c.progress_bar = True

  c.debug = ml_collections.ConfigDict()
  c.debug.stop_after_steps = -1  # > 0: stop after this many optimiser steps (simulated kill)
  c.debug.nan_at_step = -1  # > 0: the k-th optimiser step (1-based) gets a NaN batch (tests)
  c.debug.signal_at_step = -1  # > 0: SIGTERM to this process after that optimiser step (tests)
  # > 0: SIGKILL to this process after that optimiser step and its checkpoint, if one is due (a
  # crash without any clean-up; multi-host tests pass it to one process only)
  c.debug.kill_at_step = -1
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` (a ValueError) naming a bad config value and the fix."""
  s = config.search
  if s.eval_bn not in ("batch", "running"):
    raise errors.ConfigError(f"config.search.eval_bn={s.eval_bn!r}; use 'batch' or 'running'")
  if s.penalty_mode not in PENALTY_MODES:
    raise errors.ConfigError(f"config.search.penalty_mode={s.penalty_mode!r}; use one of "
                             f"{PENALTY_MODES}")
  if s.iterations < 0 or s.warmup_epochs < 0:
    raise errors.ConfigError(
        "config.search.iterations and config.search.warmup_epochs must be >= 0")
  for name in ("warmup", "search", "val"):
    if name not in config.data.splits or int(config.data.splits[name]) <= 0:
      raise errors.ConfigError(f"config.data.splits needs a positive {name!r} size, got "
                               f"{dict(config.data.splits)}")
  if config.curvature.kind not in curvature_lib.CURVATURE_FNS:
    raise errors.ConfigError(f"config.curvature.kind={config.curvature.kind!r}; choose one of "
                             f"{sorted(curvature_lib.CURVATURE_FNS)}")
  if config.curvature.num_batches < 1:
    raise errors.ConfigError("config.curvature.num_batches must be >= 1")
  config_files.check_batch_sizes({"search.batch_size": config.search.batch_size,
                                  "search.eval_batch_size": config.search.eval_batch_size},
                                 jax.device_count())
  config_files.check_batch_sizes({"curvature.batch_size": _curvature_batch_size(config)},
                                 jax.device_count(), " (-1 means search.batch_size)")
  if not isinstance(config.search.get("compile_ahead", True), bool):
    raise errors.ConfigError(f"config.search.compile_ahead={config.search.compile_ahead!r}; "
                             "use True or False")
  try:
    layers.resolve_dw_impl(config.model.get("dw_impl", "auto"))
  except ValueError as e:
    raise errors.ConfigError(f"config.model.dw_impl: {e}") from None
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  try:
    supernet.check_loop_options(config.model.get("edge_loop", "scan"),
                                config.model.get("pruned_ops", "skip"))
  except ValueError as e:
    raise errors.ConfigError(f"config.model.{e}") from None
  if not isinstance(config.model.get("remat", True), bool):
    raise errors.ConfigError(f"config.model.remat={config.model.remat!r}; use True or False")
  if config.checkpoint.every_steps < 1 or config.log_every_steps < 1:
    raise errors.ConfigError(
        "config.checkpoint.every_steps and config.log_every_steps must be >= 1")
  b = config.bayes
  if b.prune_mode not in bayes.PRUNE_MODES:
    raise errors.ConfigError(
        f"config.bayes.prune_mode={b.prune_mode!r}; use one of {bayes.PRUNE_MODES}")
  for name in ("lambda_origin", "lambda_op", "eps_omega", "gamma_init", "omega_init"):
    if not float(b[name]) > 0:
      raise errors.ConfigError(f"config.bayes.{name}={b[name]} must be > 0")
  if not float(b.prune_threshold) >= 0:
    raise errors.ConfigError(
        f"config.bayes.prune_threshold={b.prune_threshold} must be >= 0 (0 disables pruning)")
  if int(config.genotype.max_ops) < 0:
    raise errors.ConfigError(
        f"config.genotype.max_ops={config.genotype.max_ops}; use 0 (keep every surviving op) or "
        "a positive cap such as 13")
  if int(config.genotype.max_ops) and config.space == "nb201":
    raise errors.ConfigError(
        "config.genotype.max_ops applies to the bayesnas and darts spaces; the nb201 search "
        "exports one op per edge by gamma (nb201_arch.txt): set it to 0")
  try:
    spaces.get_space(config.space)
  except ValueError as e:
    raise errors.ConfigError(f"config.space: {e}") from None


def _curvature_scale(config) -> float:
  scale = float(config.bayes.curvature_scale)
  return float(config.search.batch_size) if scale < 0 else scale


def _curvature_batch_size(config) -> int:
  b = int(config.curvature.batch_size)
  return int(config.search.batch_size) if b < 0 else b


# Config fields that may change when a run resumes from its checkpoints (prefix match); any other
# difference is refused, because it would not match the checkpointed state or its data position.
RESUME_SAFE_FIELDS = ("search.iterations", "log_every_steps", "progress_bar", "checkpoint.",
                      "debug.", "data.data_dir", "nb201.table", "model.dw_impl",
                      "model.edge_loop", "model.pruned_ops", "model.remat", "search.compile_ahead",
                      "distributed")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`config_files.write_config` with the search's `RESUME_SAFE_FIELDS`."""
  config_files.write_config(config, workdir, RESUME_SAFE_FIELDS)


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Opens every file and folder `config` names; run before the workdir is created.

  The data (`dataset_lib.check_data`: the data folder and every file of its layout) and, in
  the nb201 space, the NAS-Bench-201 table (`_load_nb201_table`). Logs nothing.

  Raises:
    dataset_lib.DatasetError: missing or unreadable data (naming config.data.data_dir).
    errors.ConfigError: a named NAS-Bench-201 table that is missing or cannot be loaded, or an
      unknown config.nb201.dataset.
  """
  dataset_lib.check_data(config.data)
  _load_nb201_table(config, log=False)


def _load_nb201_table(config: ml_collections.ConfigDict, *, log: bool = True):
  """The `nb201.NB201Table` of an nb201-space search, or None.

  A table is named by config.nb201.table, else by ``$BNAS_NB201_TABLE``; a named table must load.
  Unnamed, the default table is used when it loads; otherwise the look-ups are off (None), said
  in one warning when `log`. Other spaces: None.

  Raises:
    errors.ConfigError: a named table that is missing or cannot be loaded (naming the field and
      the fix), or a config.nb201.dataset the benchmark does not have.
  """
  if config.space != "nb201":
    return None
  from bnas_jax import nb201  # pylint: disable=g-import-not-at-top
  if config.nb201.dataset not in nb201.DATASETS:
    raise errors.ConfigError(f"config.nb201.dataset={config.nb201.dataset!r}; use one of "
                             f"{list(nb201.DATASETS)}")
  env = os.environ.get(nb201.TABLE_ENV_VAR) or None
  named = config.nb201.table or env
  field = "config.nb201.table" if config.nb201.table else f"${nb201.TABLE_ENV_VAR}"
  if named is None and str(config.data.name).lower() != config.nb201.dataset.lower():
    if log:  # the table scores cells trained on its own data set, not on this one
      logging.warning("NAS-Bench-201 look-ups are off: the search data (config.data.name=%r) is "
                      "not the table's data set (config.nb201.dataset=%r)", config.data.name,
                      config.nb201.dataset)
    return None
  try:
    return nb201.load_table(named, config.nb201.dataset)
  except Exception as e:  # pylint: disable=broad-except  (a bad zip or CSV fails in many ways)
    if named is None:
      if log:
        logging.warning("NAS-Bench-201 look-ups are off: no table is named (config.nb201.table) "
                        "and the default one is unavailable (%s)", str(e).splitlines()[0])
      return None
    path = os.path.abspath(os.path.expanduser(named))
    if not os.path.exists(path):
      raise errors.ConfigError(
          f"{field}={named!r}: {path} does not exist; fix the path (a NASLib nb201 zip or an "
          f"'arch,accuracy' CSV), or unset it to search without NAS-Bench-201 look-ups") from None
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise errors.ConfigError(
        f"{field}={named!r} cannot be loaded ({type(e).__name__}: {first}); fix the file or the "
        "path, or unset it to search without NAS-Bench-201 look-ups") from None


# --------------------------------------------------------------------------------------------------
# Model, state and the jitted step functions.
# --------------------------------------------------------------------------------------------------


def create_model(config, num_classes: int, alive: spaces.FrozenMask | None = None):
  """The supernet of `config` with static mask `alive` (None = all ops)."""
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  kwargs = {k: v for k, v in config.model.items() if k not in ("init_channels", "num_cells")}
  return supernet.create_supernet(config.space, init_channels=config.model.init_channels,
                                  num_cells=config.model.num_cells, num_classes=num_classes,
                                  alive=alive, **kwargs)


def cell_counts(config) -> dict[str, int]:
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  return dict(supernet.cell_counts(config.space, config.model.num_cells))


def init_state(config, num_classes: int, switch_shapes: Mapping[str, tuple[int, ...]],
               key: jax.Array, image_shape: tuple[int, int, int] = (32, 32, 3)) -> dict[str, Any]:
  """The full search state (pure; jit it with replicated out_shardings) for images of
  ``image_shape`` ``(H, W, C)`` (the parameters depend on C only).

  Returns:
    ``{'params', 'batch_stats', 'switches' {tau: f32[n, E, K]} (ones), 'opt_w', 'opt_s',
    'prior' (bayes.HardPriorState), 'rng' u32[2] (key data of `key`), 'step' i32[]}``.
  """
  model = create_model(config, num_classes)
  seed = int(config.seed)
  k_init, k_prior = jax.random.split(key)
  switches = {t: jnp.ones(s, jnp.float32) for t, s in switch_shapes.items()}
  images = jnp.zeros((2, *image_shape), jnp.float32)
  variables = model.init(k_init, images, switches, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx_w, tx_s = _optimizers(config)
  prior = bayes.init(switches, key=k_prior, random_init=bool(config.bayes.random_init),
                     gamma_init=float(config.bayes.gamma_init),
                     omega_init=float(config.bayes.omega_init))
  return {"params": params, "batch_stats": batch_stats, "switches": switches,
          "opt_w": tx_w.init(params), "opt_s": tx_s.init(switches), "prior": prior,
          "rng": jax.random.key_data(jax.random.key(seed)), "step": jnp.zeros((), jnp.int32)}


def _optimizers(config):
  s = config.search
  # PyTorch SGD(weight_decay=wd): the decay enters the gradient before momentum.
  tx_w = optax.chain(optax.add_decayed_weights(float(s.weight_decay)),
                     optax.sgd(float(s.lr), momentum=float(s.momentum)))
  tx_s = optax.chain(optax.sgd(float(s.switch_lr), momentum=float(s.switch_momentum)),
                     bayes.mask_updates())
  return tx_w, tx_s


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


def new_train_acc() -> dict[str, jax.Array]:
  """Device-side running sums of a training phase, fetched every ``log_every_steps``."""
  z = lambda: np.zeros((), np.float32)  # distinct buffers: the accumulator is donated
  return {"loss": z(), "nll": z(), "penalty": z(), "correct": z(), "count": z(), "steps": z(),
          "grad_norm": z(), "switch_grad_norm": z(), "nonfinite": np.zeros((), np.int32),
          "first_bad_step": np.full((), -1, np.int32)}


def _acc_update(acc, *, loss, nll, penalty, correct, count, grad_norm, switch_grad_norm, step):
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(switch_grad_norm)
  return {"loss": acc["loss"] + loss, "nll": acc["nll"] + nll, "penalty": acc["penalty"] + penalty,
          "correct": acc["correct"] + correct, "count": acc["count"] + count,
          "steps": acc["steps"] + 1.0, "grad_norm": acc["grad_norm"] + grad_norm,
          "switch_grad_norm": acc["switch_grad_norm"] + switch_grad_norm,
          "nonfinite": acc["nonfinite"] + (~finite).astype(jnp.int32),
          "first_bad_step": jnp.where((acc["first_bad_step"] < 0) & ~finite, step,
                                      acc["first_bad_step"])}


@dataclasses.dataclass(frozen=True)
class _StaticKey:
  """Everything the compiled step functions depend on (hashable: the compile cache key)."""
  config_json: str  # the parts of the config that enter the step functions
  num_classes: int
  alive: spaces.FrozenMask | None
  mesh: jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted functions of one alive mask (compiled once, reused for every epoch).

  `warmup_step` and `search_step` are `train_step` with its phase flag bound (one program).
  """
  train_step: Any
  warmup_step: Any
  search_step: Any
  eval_step: Any
  curvature_fn: Any
  prior_update: Any


# The config fields the step functions read (others, e.g. the number of iterations, do not force a
# recompilation, so runs that differ only there share the compiled functions in one process).
_STATIC_FIELDS = {
    "search": ("lr", "momentum", "weight_decay", "switch_lr", "switch_momentum", "penalty_mode",
               "eval_bn"),
    "bayes": ("lambda_origin", "lambda_op", "prune_threshold", "prune_mode", "eps_omega",
              "fidelity", "random_init", "gamma_init", "omega_init"),
    "curvature": ("kind", "chunk_size"),
}


def _static_key(config, num_classes, alive, mesh) -> _StaticKey:
  part = {k: {f: config[k][f] for f in fields} for k, fields in _STATIC_FIELDS.items()}
  part["model"] = config.model.to_dict()
  part["space"] = config.space
  return _StaticKey(json.dumps(part, sort_keys=True), num_classes, alive, mesh)


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


@functools.lru_cache(maxsize=8)
def _build_step_fns(key: _StaticKey) -> StepFns:
  config = ml_collections.ConfigDict(json.loads(key.config_json))
  model = create_model(config, key.num_classes, key.alive)
  tx_w, tx_s = _optimizers(config)
  lam_o, lam_op = float(config.bayes.lambda_origin), float(config.bayes.lambda_op)
  proximal = config.search.penalty_mode == "proximal"
  # The group soft-threshold after a momentum-mu SGD step: momentum amplifies a steady gradient,
  # the subgradient mode's penalty gradient included, by 1/(1 - mu); the proximal step uses the
  # same effective step size lr/(1 - mu), so both modes shrink the switches alike at one lambda.
  prox_step = float(config.search.switch_lr) / (1.0 - float(config.search.switch_momentum))
  eval_batch_bn = config.search.eval_bn == "batch"
  replicated = NamedSharding(key.mesh, P())
  space = spaces.get_space(config.space)

  def forward_train(params, batch_stats, switches, images):
    logits, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  switches, train=True, mutable=["batch_stats"])
    return logits, mutated.get("batch_stats", {})

  def train_step(state, acc, batch, update_switches):
    """One SGD step; `update_switches` (bool[], traced) selects the phase at run time.

    False = the warm-up step (spec 5 step 1): the switches stay at 1 (they are never trained
    before the warm-up ends, so ``state['switches']`` is all ones) and are not updated, their
    optimizer state is kept, the logged loss is the NLL. True = the search step: NLL + penalty,
    weights and switches updated. One compiled program serves both phases (one compilation less
    per run: minutes for the official supernet on CPU or GPU).
    """
    prior = state["prior"]

    def loss_fn(params, switches):
      logits, new_bs = forward_train(params, state["batch_stats"], switches, batch["image"])
      nll, correct = _nll_and_correct(logits, batch["label"])
      nll = jnp.mean(nll)
      pen = (jnp.zeros(()) if proximal else bayes.penalty(switches, prior, lam_o, lam_op))
      return nll + pen, (nll, pen, new_bs, jnp.sum(correct))

    (_, (nll, pen, new_bs, correct)), (g_w, g_s) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state["params"], state["switches"])
    upd_w, opt_w = tx_w.update(g_w, state["opt_w"], state["params"])
    upd_s, opt_s = tx_s.update(g_s, state["opt_s"], state["switches"], alive=prior.alive)
    switches = optax.apply_updates(state["switches"], upd_s)
    if proximal:
      switches = bayes.prox_group_l1(switches, prior, lam_o, lam_op, prox_step)
      pen = bayes.penalty(switches, prior, lam_o, lam_op)
    switches = bayes.apply_mask(switches, prior.alive)
    keep = lambda new, old: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda n, o: jnp.where(update_switches, n, o), new, old)
    switches = keep(switches, state["switches"])
    opt_s = keep(opt_s, state["opt_s"])
    pen = jnp.where(update_switches, pen, 0.0)
    new = dict(state, params=optax.apply_updates(state["params"], upd_w), opt_w=opt_w,
               switches=switches, opt_s=opt_s,
               batch_stats=_merge_collection(state["batch_stats"], new_bs),
               step=state["step"] + 1)
    acc = _acc_update(acc, loss=nll + pen, nll=nll, penalty=pen, correct=correct,
                      count=float(batch["label"].shape[0]), grad_norm=optax.tree.norm(g_w),
                      switch_grad_norm=jnp.where(update_switches, optax.tree.norm(g_s), 0.0),
                      step=state["step"])
    return new, acc

  def eval_step(state, acc, batch):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if eval_batch_bn:
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

  # 'shift_vjp' depthwise convs have a custom VJP and no forward mode: the curvature variants that
  # use jvp / linearize get the same network with plain 'shift' convs (identical values).
  curv_model = model
  if (getattr(model, "dw_impl", "shift") == "shift_vjp"
      and config.curvature.kind not in curvature_lib.REVERSE_MODE_KINDS):
    curv_model = model.clone(dw_impl="shift")

  apply_fn = functools.partial(curvature_apply, curv_model)
  opts = {}
  if int(config.curvature.chunk_size) > 0:
    opts["chunk_size"] = int(config.curvature.chunk_size)
  curvature_fn = curvature_lib.make_curvature_fn(config.curvature.kind, apply_fn, jit=True,
                                                 **opts)

  def prior_update(prior, switches, h):
    prior = bayes.update(prior, switches, h, lambda_origin=lam_o, lambda_op=lam_op,
                         prune_threshold=float(config.bayes.prune_threshold),
                         prune_mode=config.bayes.prune_mode,
                         eps_omega=float(config.bayes.eps_omega),
                         fidelity=bool(config.bayes.fidelity), cells=space.cells)
    return prior, bayes.apply_mask(switches, prior.alive)  # pruned switches exactly 0

  # Each compilation is logged before it starts (what, and how long it took last time).
  if key.alive is None:
    detail = "full supernet"
  else:
    live = sum(v for _, rows in key.alive for row in rows for v in row)
    detail = f"pruned supernet, {live} of {sum(len(row) for _, rows in key.alive for row in rows)}"
    detail += " op groups live"
  program = repr((key.config_json, key.num_classes, key.alive))
  logged = functools.partial(phases.LoggedJit, detail=detail, program=program)
  train_step = logged(
      jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(replicated, replicated)),
      "train step")
  return StepFns(
      train_step=train_step,
      warmup_step=lambda state, acc, batch: train_step(state, acc, batch, False),
      search_step=lambda state, acc, batch: train_step(state, acc, batch, True),
      eval_step=logged(jax.jit(eval_step, donate_argnums=(1,), out_shardings=replicated),
                       "eval step"),
      curvature_fn=logged(curvature_fn, f"curvature pass ({config.curvature.kind})"),
      prior_update=logged(jax.jit(prior_update, out_shardings=replicated), "prior update"))


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
  """What `run` returns (also written to ``<workdir>/summary.json``).

  Attributes:
    completed: False if the run stopped early (SIGINT / SIGTERM, ``debug.stop_after_steps``).
    genotype: the final `bnas_jax.genotype.Genotype` (None if not completed).
    gamma: group prior variances ``{tau: f32[E, K]}`` (numpy) at the end.
    alive: group mask ``{tau: bool[E, K]}`` at the end.
    val_accuracy: supernet accuracy on the val split after the last iteration (or warm-up).
    history: one dict per finished outer iteration (val accuracy, live switches, genotype, ...).
    global_step: optimiser steps taken.
    stopped_by: the signal that stopped the run ('' otherwise).
  """
  completed: bool
  genotype: Any
  gamma: dict[str, np.ndarray]
  alive: dict[str, np.ndarray]
  val_accuracy: float | None
  history: list[dict[str, Any]]
  global_step: int
  stopped_by: str = ""  # 'SIGINT' / 'SIGTERM' when a signal stopped the run (checkpointed)


@dataclasses.dataclass
class _Position:
  """Where the run is: the next thing to do (stored in every checkpoint's meta)."""
  phase: str = PHASE_WARMUP
  iteration: int = 0  # outer iteration t (1-based) of the search/update phases; 0 in warm-up
  epoch: int = 0  # warm-up epoch index
  step: int = 0  # next step inside the current epoch
  global_step: int = 0


class _Runner:
  """Holds the per-run objects; `run` is the only public entry."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.space = spaces.get_space(config.space)
    self.mesh = sharding_lib.make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)

    self.dataset = readers.load_dataset(config.data)
    dataset_lib.check_image_shape(self.dataset.image_shape)
    self.splits = pipeline.make_splits(self.dataset, dict(config.data.splits),
                                             int(config.data.seed))
    self.num_classes = int(self.dataset.num_classes)
    self.cell_counts = cell_counts(config)
    self.switch_shapes = self.space.switch_shapes(self.cell_counts)
    self.writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"),
                                           enabled=self.is_main)
    self.ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(config.checkpoint.max_to_keep),
        async_save=bool(config.checkpoint.async_save))
    self.save_index = -1
    self.last_good: tuple[int, int] | None = None  # (save index, global step)
    self.history: list[dict[str, Any]] = []
    self.val_accuracy: float | None = None
    self._nb201_table = _load_nb201_table(config)  # None: no look-ups (warned once if unnamed)
    self.stop = _StopSignal()
    self._compile_pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="compile_ahead")
    self._compiling: list[concurrent.futures.Future] = []

  # ---- helpers ----------------------------------------------------------------------------------

  def steps_in(self, split: str, batch_size: int) -> int:
    n = pipeline.steps_per_epoch(len(self.splits[split][1]), batch_size)
    cap = int(self.config.search.max_steps_per_epoch)
    if n == 0:
      raise ValueError(f"the {split!r} split ({len(self.splits[split][1])} examples) is smaller "
                       f"than one batch ({batch_size}); enlarge config.data.splits.{split}")
    return min(n, cap) if cap > 0 else n

  def fns(self, alive_mask) -> StepFns:
    frozen = spaces.freeze_mask(alive_mask)
    if all(all(row) for _, rows in frozen for row in rows):
      frozen = None  # the full supernet: share the warm-up compilation
    return _build_step_fns(_static_key(self.config, self.num_classes, frozen, self.mesh))

  def abstract_state(self):
    shapes = jax.eval_shape(functools.partial(init_state, self.config, self.num_classes,
                                              self.switch_shapes,
                                              image_shape=self.dataset.image_shape), _init_key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                        shapes)

  def fresh_state(self):
    """Initial state, computed on one device and replicated (identical for any device count)."""
    key = _init_key(int(self.config.seed))
    init = jax.jit(functools.partial(init_state, self.config, self.num_classes, self.switch_shapes,
                                     image_shape=self.dataset.image_shape))
    init = phases.LoggedJit(init, "state initialisation", program=repr(
        (_static_key(self.config, self.num_classes, None, self.mesh).config_json,
         self.switch_shapes, self.dataset.image_shape)))
    return self.replicate(init(key))

  def replicate(self, tree):
    """Host/one-device pytree -> arrays replicated over the mesh, one distinct buffer per leaf."""
    if jax.process_count() == 1:
      return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), self.replicated), tree)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

  def meta(self, pos: _Position) -> dict[str, Any]:
    return {"position": dataclasses.asdict(pos), "history": self.history,
            "val_accuracy": self.val_accuracy, "seed": int(self.config.seed),
            "data_seed": int(self.config.data.seed)}

  def compile_ahead(self, state, alive, *, train: bool = False, evaluate: bool = False,
                    curvature_iteration: int | None = None) -> None:
    """Starts compiling step functions of mask `alive` in background threads.

    ``jit(f).lower(*args).compile()`` fills f's own compilation cache, so the first real call
    runs at once. The abstract arguments come from the same pipelines as the real calls (one
    example batch each), so the signatures match. A failure is logged and left to the real call.
    Off with ``search.compile_ahead=False``.
    """
    if not bool(self.config.search.compile_ahead):
      return
    c = self.config
    fns = self.fns(alive)
    spec = lambda tree: jax.tree.map(_abstract, tree)
    jobs = []
    if train:
      b = int(c.search.batch_size)
      images, labels = self.splits["search"]
      batch = next(pipeline.Loader(
          images[:b], labels[:b], batch_size=b, seed=0, mean=self.dataset.mean,
          std=self.dataset.std, augment=True, cutout=int(c.search.switch_cutout),
          sharding=self.batch_sharding).epoch(0))
      jobs.append(("train_step", fns.train_step,
                   (spec(state), spec(self.replicate(new_train_acc())), spec(batch), True)))
    if evaluate:
      jobs.append(("eval_step", fns.eval_step,
                   (spec(state), spec(self.new_eval_acc()), spec(next(iter(self.eval_batches()))))))
    if curvature_iteration is not None:
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      key = jax.random.fold_in(self.curvature_key(state, curvature_iteration), 0)
      batch = next(iter(self.curvature_batches(curvature_iteration)))
      jobs.append(("curvature_fn", fns.curvature_fn,
                   (spec(state["switches"]), spec(variables), spec(batch), key)))
    for name, fn, args in jobs:
      self._compiling.append(self._compile_pool.submit(_compile, name, fn, args))

  def wait_compiles(self) -> None:
    """Blocks until the background compilations have finished."""
    for f in self._compiling:
      f.result()
    self._compiling = []

  def stop_requested(self, *, at_log_step: bool = True) -> bool:
    """Whether SIGINT / SIGTERM asked the run to stop (agreed by all processes).

    One process checks after every step; several processes agree at logging steps only (one
    small all-gather of the signal numbers), so that all of them checkpoint the same step and
    stop as if they had received the signal (`SearchResult.stopped_by`, main's exit status).
    """
    if jax.process_count() == 1:
      return self.stop.requested
    if not at_log_step:
      return False
    mine = int(getattr(signal, self.stop.name)) if self.stop.requested else 0
    signums = multihost_utils.process_allgather(np.asarray(mine, np.int32))
    if np.any(signums) and not self.stop.requested:
      self.stop.requested = True
      self.stop.name = signal.Signals(int(np.max(signums))).name
      logging.warning("another process received %s: checkpointing this step and stopping",
                      self.stop.name)
    return bool(np.any(signums))

  def save(self, state, pos: _Position) -> None:
    """Saves a checkpoint (the caller has checked that everything since the last one is finite)."""
    self.save_index += 1
    if self.config.checkpoint.async_save:
      state = jax.tree.map(jnp.copy, state)  # the live buffers are donated to the next step
    self.ckpt.save(self.save_index, state, self.meta(pos))
    self.last_good = (self.save_index, pos.global_step)

  def fail_nonfinite(self, what: str, pos: _Position, step: int | None = None) -> None:
    self.ckpt.wait()
    where = (f"optimiser step {step + 1}" if step is not None and step >= 0
             else f"the update after optimiser step {pos.global_step}")
    kept = (f"the last good checkpoint (#{self.last_good[0]}, after optimiser step "
            f"{self.last_good[1]}) is kept in {self.ckpt.directory}"
            if self.last_good else "no checkpoint had been written yet")
    msg = (f"non-finite {what} in {where} (phase {pos.phase!r}, iteration {pos.iteration}, "
           f"epoch {pos.epoch}): stopping the run; {kept}. Lower search.lr / search.switch_lr "
           "or check the data, then rerun with the same --workdir to resume from it.")
    logging.error(msg)
    raise NonFiniteError(msg)

  # ---- phases -----------------------------------------------------------------------------------

  def run_epoch(self, state, pos: _Position, phase: str) -> tuple[Any, _Position, bool]:
    """Runs (the rest of) one warm-up or search epoch. Returns (state, pos, interrupted)."""
    c = self.config
    prior_alive = {t: np.asarray(a) for t, a in state["prior"].alive.items()}
    fns = self.fns(prior_alive)
    if phase == PHASE_WARMUP:
      split, step_fn, epoch = "warmup", fns.warmup_step, pos.epoch
      augment_cutout = int(c.data.cutout)
      data_epoch = epoch
      desc = f"warm-up {epoch + 1}/{c.search.warmup_epochs}"
    else:
      split, step_fn = "search", fns.search_step
      augment_cutout = int(c.search.switch_cutout)
      data_epoch = pos.iteration - 1
      desc = f"search t={pos.iteration}/{c.search.iterations}"
    images, labels = self.splits[split]
    b = int(c.search.batch_size)
    steps = self.steps_in(split, b)
    # Distinct data streams per phase: the split names seed different permutations/augmentations.
    seed = _phase_seed(int(c.data.seed), split)
    batches = pipeline.Loader(
        images, labels, batch_size=b, seed=seed, mean=self.dataset.mean,
        std=self.dataset.std, augment=True, cutout=augment_cutout,
        sharding=self.batch_sharding).epoch(data_epoch, pos.step)
    acc = self.replicate(new_train_acc())
    bar = metrics_lib.Progress(steps, desc, initial=pos.step,
                               enabled=bool(c.progress_bar) and self.is_main)
    t_window, steps_window = time.perf_counter(), 0
    stop_after = int(c.debug.stop_after_steps)
    nan_at = int(c.debug.nan_at_step)
    signal_at = int(c.debug.get("signal_at_step", -1))
    try:
      for step in range(pos.step, steps):
        batch = next(batches)
        if pos.global_step + 1 == nan_at:
          batch = dict(batch, image=batch["image"] * jnp.nan)
        state, acc = step_fn(state, acc, batch)
        pos.step, pos.global_step = step + 1, pos.global_step + 1
        steps_window += 1
        bar.update(1)
        log_now = pos.global_step % int(c.log_every_steps) == 0 or pos.step == steps
        save_now = pos.global_step % int(c.checkpoint.every_steps) == 0
        stop_now = stop_after > 0 and pos.global_step >= stop_after
        if log_now or save_now or stop_now:
          acc = self.log_train(acc, pos, phase, state, time.perf_counter() - t_window,
                               steps_window)
          t_window, steps_window = time.perf_counter(), 0
          if save_now and pos.step < steps:
            self.save(state, pos)
        if stop_now:
          logging.warning("debug.stop_after_steps=%d reached: stopping without a final "
                          "checkpoint (simulated kill)", stop_after)
          return state, pos, True
        if pos.global_step == signal_at:
          os.kill(os.getpid(), signal.SIGTERM)
        if pos.global_step == int(c.debug.get("kill_at_step", -1)):
          self.ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        if pos.step < steps and self.stop_requested(at_log_step=log_now):
          if not log_now:  # flush and check the steps since the last log
            acc = self.log_train(acc, pos, phase, state, time.perf_counter() - t_window,
                                 steps_window)
          if not save_now:  # (else this step's checkpoint was just written)
            self.save(state, pos)
          return state, pos, True
    finally:
      bar.close()
    return state, pos, False

  def log_train(self, acc, pos: _Position, phase: str, state, seconds: float, steps: int):
    """Fetches the device sums, checks finiteness, writes metrics; returns a fresh accumulator."""
    host = jax.device_get(acc)
    if int(host["nonfinite"]) > 0:
      self.fail_nonfinite("loss or gradient", pos, int(host["first_bad_step"]))
    n = max(float(host["steps"]), 1.0)
    count = max(float(host["count"]), 1.0)
    scalars = {"loss": host["loss"] / n, "nll": host["nll"] / n,
               "accuracy": host["correct"] / count,
               "grad_norm": host["grad_norm"] / n, "step_time_s": seconds / max(steps, 1),
               "epoch_step": pos.step}
    if phase == PHASE_SEARCH:
      scalars.update(penalty=host["penalty"] / n, switch_grad_norm=host["switch_grad_norm"] / n,
                     iteration=pos.iteration)
    self.writer.write_scalars(pos.global_step, scalars, prefix=f"{phase}/")
    return self.replicate(new_train_acc())

  def eval_batches(self):
    """The val split's batches (padded last batch with a ``'mask'``), in order."""
    c = self.config
    images, labels = self.splits["val"]
    limit = int(c.search.max_eval_examples)
    if limit > 0:
      images, labels = images[:limit], labels[:limit]
    return pipeline.Loader(
        images, labels, batch_size=int(c.search.eval_batch_size), seed=0,
        mean=self.dataset.mean, std=self.dataset.std, augment=False, shuffle=False,
        drop_remainder=False, sharding=self.batch_sharding).epoch(0)

  def new_eval_acc(self):
    return self.replicate({k: np.zeros((), np.float32) for k in ("nll", "correct", "count")})

  def evaluate(self, state) -> dict[str, float]:
    """Supernet loss/accuracy on the val split (batch norm per ``search.eval_bn``)."""
    fns = self.fns({t: np.asarray(a) for t, a in state["prior"].alive.items()})
    acc = self.new_eval_acc()
    for batch in self.eval_batches():
      acc = fns.eval_step(state, acc, batch)
    host = jax.device_get(acc)
    count = max(float(host["count"]), 1.0)
    return {"val_accuracy": float(host["correct"]) / count, "val_nll": float(host["nll"]) / count}

  def curvature_batches(self, iteration: int):
    """The M curvature batches of outer iteration `iteration` (search split, no augmentation)."""
    c = self.config
    images, labels = self.splits["search"]
    b = _curvature_batch_size(c)
    m = int(c.curvature.num_batches)
    available = pipeline.steps_per_epoch(len(labels), b)
    if available < m:
      raise ValueError(f"curvature.num_batches={m} batches of {b} need {m * b} search examples, "
                       f"the split has {len(labels)}")
    batches = pipeline.Loader(
        images, labels, batch_size=b, seed=_phase_seed(int(c.data.seed), "curvature"),
        mean=self.dataset.mean, std=self.dataset.std, augment=False,
        sharding=self.batch_sharding).epoch(iteration - 1)
    return itertools.islice(batches, m)

  def curvature_progress(self, iteration: int) -> phases.PassProgress:
    """Log lines with an ETA (and a bar with ``progress_bar``) over the curvature pass."""
    c = self.config
    return phases.PassProgress(
        int(c.curvature.num_batches), f"curvature pass t={iteration}/{c.search.iterations}",
        log=self.is_main, bar=bool(c.progress_bar) and self.is_main)

  @staticmethod
  def curvature_key(state, iteration: int) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), iteration)

  def curvature(self, state, pos: _Position):
    """Mean-loss curvature diagonal over M search batches, times ``bayes.curvature_scale``."""
    c = self.config
    alive = {t: np.asarray(a) for t, a in state["prior"].alive.items()}
    fns = self.fns(alive)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    key = self.curvature_key(state, pos.iteration)
    h = curvature_lib.accumulate(fns.curvature_fn, state["switches"], variables,
                                 self.curvature_batches(pos.iteration), key,
                                 progress=self.curvature_progress(pos.iteration))
    scale = _curvature_scale(c)
    return jax.tree.map(lambda x: x * scale, h)

  def update(self, state, pos: _Position):
    """Curvature pass + prior update + eval + genotype of iteration ``pos.iteration``."""
    t = pos.iteration
    t0 = time.perf_counter()
    h = self.curvature(state, pos)
    old_alive = {tt: np.asarray(a) for tt, a in state["prior"].alive.items()}
    fns = self.fns(old_alive)
    gamma_prev, switches_prev = state["prior"].gamma, state["switches"]
    prior, switches = fns.prior_update(state["prior"], state["switches"], h)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
        (h, prior.gamma, prior.omega, prior.posterior_variance)))
    if not finite:
      self.fail_nonfinite("curvature or prior state", pos)
    state = dict(state, prior=prior, switches=switches)
    alive = {tt: np.asarray(a) for tt, a in prior.alive.items()}
    more = t < int(self.config.search.iterations)
    if more and any(not np.array_equal(alive[tt], old_alive[tt]) for tt in alive):
      # Pruned: the next epoch runs new programs; compile them while this thread evaluates.
      self.compile_ahead(state, alive, train=True, curvature_iteration=t + 1)
    update_s = time.perf_counter() - t0
    ev = self.evaluate(state)
    self.val_accuracy = ev["val_accuracy"]
    summ = {k: float(v) for k, v in jax.device_get(bayes.summaries(prior)).items()}
    calib = {k: float(v) for k, v in jax.device_get(bayes.calibration(gamma_prev, prior)).items()}
    genotype_obj = self.derive(prior)
    record = {"iteration": t, "global_step": pos.global_step, **ev,
              "live_groups": int(summ["live_groups"]),
              "live_switches": int(sum(v for k, v in summ.items() if k.endswith("/live_switches"))),
              "curvature_and_update_s": update_s, "calibration": calib,
              "genotype": _genotype_json(genotype_obj)}
    nb = self.nb201_accuracy(prior)
    if nb is not None:
      record.update(nb)
    self.history.append(record)
    self.writer.write_scalars(pos.global_step, summ, log=False, prefix="prior/")
    self.writer.write_scalars(pos.global_step, calib, log=False, prefix="calibration/")
    self.writer.write_scalars(pos.global_step, {k: v for k, v in record.items()
                                                if isinstance(v, (int, float))},
                              prefix="iteration/")
    self.writer.write_text(pos.global_step, "genotype", str(genotype_obj))
    logging.info("iteration %d: val accuracy %.4f, %d live groups; prior: %s", t,
                 ev["val_accuracy"], summ["live_groups"],
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(summ.items())
                           if "median" in k or "live" in k)
                 + "; gamma*H medians: " + ", ".join(f"{k.replace('/gammaH_q50', '')}={v:.3g}"
                                                     for k, v in calib.items() if "q50" in k))
    self.write_outputs(os.path.join(self.workdir, "iterations", f"t{t:02d}"), state, genotype_obj,
                       {"gamma_prev": gamma_prev, "switches_prev": switches_prev, "h": h})
    metrics_lib.write_prior_histograms(self.writer, pos.global_step, prior, switches)
    metrics_lib.write_picture(self.writer, pos.global_step,
                              os.path.join(self.workdir, "iterations", f"t{t:02d}", "genotype.png"))
    return state

  # ---- genotype / outputs -----------------------------------------------------------------------

  def derive(self, prior):
    from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    alive = {t: np.asarray(a) for t, a in jax.device_get(prior.alive).items()}
    scores = {t: np.asarray(g) for t, g in jax.device_get(prior.score).items()}
    return genotype_lib.derive(self.space, alive, scores,
                               max_ops=int(self.config.genotype.max_ops))

  def nb201_accuracy(self, prior) -> dict[str, Any] | None:
    """NAS-Bench-201 arch string (best alive op per edge) and its table accuracy, if available."""
    if self.space.name != "nb201":
      return None
    from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    prior = jax.device_get(prior)
    alive = {t: np.asarray(a) for t, a in prior.alive.items()}
    scores = {t: np.asarray(g) for t, g in jax.device_get(prior.score).items()}
    arch = genotype_lib.derive_nb201(self.space, scores, alive)
    out = {"nb201_arch": arch}
    if self._nb201_table is not None:  # loaded at start-up
      try:
        out["nb201_accuracy"] = self._nb201_table.accuracy(arch)
        logging.info("NAS-Bench-201 %s accuracy of %s: %.2f%%", self._nb201_table.dataset, arch,
                     out["nb201_accuracy"])
      except KeyError as e:
        logging.warning("%s", e)
    return out

  def write_outputs(self, folder: str, state, genotype_obj,
                    update_inputs: Mapping[str, Any] | None = None) -> None:
    """genotype.json, cell pictures, DARTS/NB201 exports and prior.npz into `folder`.

    `update_inputs` (``{'gamma_prev', 'switches_prev', 'h'}``, each ``{tau: array}``): what the
    prior update started from, stored as ``update_inputs/<name>/<tau>`` so that the update can be
    replayed offline (``bench/curvature_ablation.py``).
    """
    if not self.is_main:
      return
    from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    os.makedirs(folder, exist_ok=True)
    genotype_obj.save(os.path.join(folder, "genotype.json"))
    genotype_lib.plot(genotype_obj, os.path.join(folder, "genotype"))
    prior = jax.device_get(state["prior"])
    alive = {t: np.asarray(a) for t, a in prior.alive.items()}
    scores = {t: np.asarray(g) for t, g in jax.device_get(prior.score).items()}
    survivors = genotype_lib.derive(self.space, alive, scores)
    if survivors != genotype_obj:  # genotype.max_ops capped the cell: keep the uncapped one too
      survivors.save(os.path.join(folder, "genotype_survivors.json"))
    if self.space.name == "darts":
      # DARTS-style export: top-2 input edges per node, one op each (genotype.derive_darts).
      darts_cell = genotype_lib.derive_darts(self.space, scores, alive)
      darts_cell.save(os.path.join(folder, "genotype_darts.json"))
      d = genotype_lib.to_darts(darts_cell)
      with open(os.path.join(folder, "genotype_darts.txt"), "w") as f:  # pastes into DARTS code
        f.write(f"Genotype(normal={[tuple(p) for p in d.normal]!r}, "
                f"normal_concat={list(d.normal_concat)!r}, "
                f"reduce={[tuple(p) for p in d.reduce]!r}, "
                f"reduce_concat={list(d.reduce_concat)!r})\n")
      genotype_lib.plot(darts_cell, os.path.join(folder, "genotype_darts"))
    if self.space.name == "nb201":
      with open(os.path.join(folder, "nb201_arch.txt"), "w") as f:
        f.write(genotype_lib.derive_nb201(self.space, scores, alive) + "\n")
    arrays = {}
    for field in ("gamma", "omega", "posterior_variance", "curvature", "alive", "score"):
      for t, v in getattr(prior, field).items():
        arrays[f"{field}/{t}"] = np.asarray(v)
    for t, v in jax.device_get(state["switches"]).items():
      arrays[f"switches/{t}"] = np.asarray(v)
    for name, tree in jax.device_get(dict(update_inputs or {})).items():
      for t, v in tree.items():
        arrays[f"update_inputs/{name}/{t}"] = np.asarray(v)
    np.savez(os.path.join(folder, "prior.npz"), **arrays)

  # ---- main loop --------------------------------------------------------------------------------

  def restore_or_init(self):
    latest = self.ckpt.latest_index()
    if latest is None:
      logging.info("starting a new search in %s", self.workdir)
      return self.fresh_state(), _Position()
    # The newest checkpoint that restores (damaged ones are skipped with a warning each); a
    # checkpoint of another layout is a ConfigError.
    index, state, meta = self.ckpt.restore_newest(self.abstract_state())
    self.save_index = latest  # new checkpoints go above every one on disk, damaged ones too
    self.last_good = (index, meta["position"]["global_step"])
    self.history = list(meta.get("history", []))
    self.val_accuracy = meta.get("val_accuracy")
    pos = _Position(**meta["position"])
    logging.info("resumed checkpoint #%d of %s at %s", index, self.workdir, pos)
    return state, pos

  def run(self) -> SearchResult:
    c = self.config
    state, pos = self.restore_or_init()
    T = int(c.search.iterations)
    if pos.phase == PHASE_DONE and pos.iteration < T:  # resumed with a larger T: search on
      logging.info("extending a finished search from %d to %d iterations", pos.iteration, T)
      pos = _Position(PHASE_SEARCH, pos.iteration + 1, 0, 0, pos.global_step)
    # While this thread compiles the train step (or the curvature), compile what comes next.
    alive = {t: np.asarray(a) for t, a in state["prior"].alive.items()}
    if pos.phase == PHASE_WARMUP:
      self.compile_ahead(state, alive, evaluate=True, curvature_iteration=1 if T > 0 else None)
    elif pos.phase == PHASE_SEARCH:
      self.compile_ahead(state, alive, evaluate=True, curvature_iteration=pos.iteration)
    elif pos.phase == PHASE_UPDATE:
      self.compile_ahead(state, alive, evaluate=True)
    while pos.phase != PHASE_DONE:
      if pos.phase == PHASE_WARMUP and pos.epoch >= int(c.search.warmup_epochs):
        pos = _Position(PHASE_SEARCH if T > 0 else PHASE_DONE, 1 if T > 0 else 0, 0, 0,
                        pos.global_step)
        if pos.phase == PHASE_DONE:  # T = 0: nothing to search
          self.save(state, pos)
          break
      if pos.phase in (PHASE_WARMUP, PHASE_SEARCH):
        phase = pos.phase
        state, pos, interrupted = self.run_epoch(state, pos, phase)
        if interrupted:
          return self.stopped(state, pos)
        if phase == PHASE_WARMUP:
          # Checkpoint the epoch's end before the evaluation (whose compilation can take minutes):
          # a kill there costs only the evaluation (a resume runs no step, then evaluates).
          self.save(state, pos)
          if self.stop_requested():
            return self.stopped(state, pos)
          ev = self.evaluate(state)
          self.val_accuracy = ev["val_accuracy"]
          self.writer.write_scalars(pos.global_step, ev, prefix="warmup/")
          pos = _Position(PHASE_WARMUP, 0, pos.epoch + 1, 0, pos.global_step)
        else:
          pos = _Position(PHASE_UPDATE, pos.iteration, 0, 0, pos.global_step)
        self.save(state, pos)
        if self.stop_requested():
          return self.stopped(state, pos)
      elif pos.phase == PHASE_UPDATE:
        state = self.update(state, pos)
        t = pos.iteration
        pos = (_Position(PHASE_SEARCH, t + 1, 0, 0, pos.global_step) if t < T
               else _Position(PHASE_DONE, t, 0, 0, pos.global_step))
        self.save(state, pos)
        if pos.phase != PHASE_DONE and self.stop_requested():
          return self.stopped(state, pos)
      else:
        raise ValueError(f"checkpoint holds an unknown phase {pos.phase!r}")
    self.ckpt.wait()
    result = self.result(state, completed=True, global_step=pos.global_step)
    return result

  def stopped(self, state, pos: _Position) -> SearchResult:
    """Ends an interrupted run (its checkpoint, if any, is written) with completed=False."""
    self.ckpt.wait()
    if self.stop.requested:
      logging.warning("stopped by %s after optimiser step %d (phase %r, iteration %d); the "
                      "checkpoint of that step is in %s: rerun with the same --workdir to resume",
                      self.stop.name, pos.global_step, pos.phase, pos.iteration,
                      self.ckpt.directory)
    return self.result(state, completed=False, global_step=pos.global_step)

  def result(self, state, *, completed: bool, global_step: int) -> SearchResult:
    prior = jax.device_get(state["prior"])
    gamma = {t: np.asarray(g) for t, g in jax.device_get(bayes.group_gamma(state["prior"])).items()}
    alive = {t: np.asarray(a) for t, a in prior.alive.items()}
    genotype_obj = None
    if completed:
      genotype_obj = self.derive(state["prior"])
      self.write_outputs(self.workdir, state, genotype_obj)
      if self.is_main:
        summary = {"completed": True, "global_step": global_step,
                   "val_accuracy": self.val_accuracy, "history": self.history,
                   "genotype": _genotype_json(genotype_obj)}
        nb = self.nb201_accuracy(state["prior"])
        if nb is not None:
          summary.update(nb)
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
          json.dump(summary, f, indent=2, default=_json_default)
        metrics_lib.write_hparams(self.writer, global_step, self.config, summary)
      logging.info("search finished: genotype %s, val accuracy %s", genotype_obj, self.val_accuracy)
    return SearchResult(completed=completed, genotype=genotype_obj, gamma=gamma, alive=alive,
                        val_accuracy=self.val_accuracy, history=list(self.history),
                        global_step=global_step,
                        stopped_by="" if completed else self.stop.name)

  def close(self) -> None:
    self._compile_pool.shutdown(wait=True, cancel_futures=True)
    self.stop.restore()
    self.ckpt.close()
    self.writer.close()


def _abstract(x):
  """A jax.Array's abstract value with its sharding (what `jit(...).lower` needs)."""
  if isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                weak_type=x.aval.weak_type)
  return x


def _compile(name: str, fn, args) -> None:
  """Compiles `fn` (a `phases.LoggedJit`: it logs the compilation) for `args` ahead of its call."""
  try:
    fn.precompile(*args, ahead=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("compiling %s ahead failed (%s: %s); it compiles on its first call instead",
                    name, type(e).__name__, e)


class _StopSignal:
  """SIGINT / SIGTERM handlers that ask the run to stop at the next step boundary.

  The first signal sets `requested` (the runner then checkpoints the step it is at and returns);
  a second one restores the default action and re-delivers the signal (SIGINT raises
  KeyboardInterrupt), so a second Ctrl-C still stops at once. Handlers are only installed from the
  main thread, and not for a signal the process was started with ignored (a background job's
  SIGINT, ``nohup``): that stays ignored.
  """
  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = False
    self.name = ""
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # second signal: give up the graceful stop
      self.restore()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.requested, self.name = True, signal.Signals(signum).name
    logging.warning("%s received: checkpointing at the next step boundary and stopping (send it "
                    "again to stop at once)", self.name)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


def _init_key(seed: int) -> jax.Array:
  """The key of `init_state`. RBG keys: the initialisers compile in seconds, whereas threefry's
  unrolled bit generator makes XLA:CPU spend minutes on a supernet's ~100 initialisers. The stored
  ``rng`` (curvature keys) is the threefry key data of the same seed."""
  return jax.random.key(seed, impl="rbg")


def _phase_seed(data_seed: int, stream: str) -> int:
  """A fixed per-stream data seed (warm-up, search, curvature batches are independent streams)."""
  return int(data_seed) * 1000 + {"warmup": 1, "search": 2, "curvature": 3}[stream]


def _genotype_json(genotype_obj) -> Any:
  return genotype_obj.to_dict()


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def _write_seeds(config, workdir: str) -> None:
  seeds = {"seed": int(config.seed), "data_seed": int(config.data.seed),
           "streams": {s: _phase_seed(int(config.data.seed), s)
                       for s in ("warmup", "search", "curvature")},
           "jax_version": jax.__version__}
  with open(os.path.join(workdir, "seeds.json"), "w") as f:
    json.dump(seeds, f, indent=2)


def run(config: ml_collections.ConfigDict, workdir: str) -> SearchResult:
  """Runs (or resumes) a BayesNAS search described by `config` in `workdir`.

  Args:
    config: a search config (`default_config` fields; see ``experiments/*.py``).
    workdir: the run directory. If it holds checkpoints the run resumes from the latest.

  Returns:
    a `SearchResult`.

  Raises:
    NonFiniteError: a non-finite loss/gradient/prior state (the last good checkpoint is kept).
    ValueError: a bad config value (`errors.ConfigError`, named, before `workdir` is created),
      e.g. a batch size that is not a positive multiple of the device count; missing or
      unreadable data (`dataset_lib.DatasetError`) or a named NAS-Bench-201 table that does
      not load (`check_inputs`), also before `workdir` is created.
  """
  check_config(config)
  check_inputs(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  metrics_lib.quiet_library_logs()
  log_file = metrics_lib.LogFile(workdir) if is_main else contextlib.nullcontext()
  with log_file:
    if is_main:
      _write_config(config, workdir)
      _write_seeds(config, workdir)
    logging.info("search space %s, %d devices (%s), workdir %s", config.space, jax.device_count(),
                 jax.default_backend(), workdir)
    runner = _Runner(config, workdir)
    try:
      return runner.run()
    finally:
      runner.close()
