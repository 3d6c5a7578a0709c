"""Search config: the defaults of every field, their checks, and the fields a resumed run may change.

`default_config` is what ``experiments/*.py`` start from; `check_config` and `check_inputs` name a
bad value or a missing input (`errors.ConfigError`, `dataset.DatasetError`) before the workdir is
created. The meaning of the fields is in `bnas_jax.search`'s module docstring and beside each
default below.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections

from bnas_jax import bayes
from bnas_jax import config_files
from bnas_jax import curvature as curvature_lib
from bnas_jax import errors
from bnas_jax import run_lib
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.models import layers
from bnas_jax.search_space import spaces

PENALTY_MODES = ("subgradient", "proximal")


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
  # Depthwise convs (bnas_jax.models.layers.depthwise_conv): 'auto' = 'shift_vjp' on CPU and
  # 'lax' on GPU/TPU; 'shift' also supports forward-mode AD. All compute the same function, so it
  # may change when a run is resumed.
  c.model.dw_impl = "auto"
  # The edges of each cell (bnas_jax.models.supernet.Cell): 'scan' = one lax.scan per cell,
  # 'unroll' = the same loop unrolled (a longer compile for a faster step, docs/performance.md).
  # Same function and parameters, so it may change when a run is resumed.
  c.model.edge_loop = "scan"
  # After pruning: 'skip' never computes a pruned op (one loop per target node and kept op set),
  # 'mask' runs the ops kept on any edge of a cell phase in one loop and zeroes the pruned ones
  # (compiles like the full supernet). Same results.
  c.model.pruned_ops = "skip"
  # Recompute each edge's forward pass in the backward pass instead of storing its activations
  # (jax.checkpoint): a smaller activation buffer; same function and gradients, so it may change
  # when a run is resumed.
  c.model.remat = True
  # BN(affine=False) after the identity skip and the pools of every edge, so that every candidate
  # op outputs unit scale and switch sizes (hence gamma) compare across ops (models/supernet.py).
  c.model.param_free_bn = False
  # BN(affine=False) after the pools only, the DARTS convention (the darts space always has it;
  # models/supernet.py). Off: in the NB201 space it left the pool on edge 0->3 and lowered the
  # 5-seed mean (docs/results.md).
  c.model.pool_bn = False
  # The PyramidNet backbone of the tree spaces (experiments/proxyless_cifar10.py): additive
  # widening alpha and the groups of its grouped convs. The cell spaces do not read them.
  c.model.alpha = 48.0
  c.model.groups = 2

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
  # threads while the main thread compiles or trains (results unchanged); for many-core hosts
  # (docs/performance.md).
  c.search.compile_ahead = False

  c.bayes = ml_collections.ConfigDict()
  c.bayes.lambda_origin = 0.01
  c.bayes.lambda_op = 0.01
  # H = curvature_scale * h / lambda with h the curvature of the mean loss: 1 is the precision of
  # the loss the switches are trained on (module docstring); -1 = search.batch_size, the original's
  # sum-over-batch units.
  c.bayes.curvature_scale = 1.0
  c.bayes.prune_threshold = 1e-3
  c.bayes.prune_mode = "relative"  # 'absolute' | 'relative' (to the median live gamma of the same
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
  # XLA:CPU backend optimisation level of the curvature pass (3: XLA's default; 1 compiles the
  # CPU proxy's ggn_fast pass a fifth faster and runs it faster, but changes H by float rounding,
  # which moves the found cells: docs/performance.md). Ignored on other platforms.
  c.curvature.cpu_opt_level = 3

  c.nb201 = ml_collections.ConfigDict()
  c.nb201.table = ml_collections.config_dict.placeholder(str)  # None: bnas_jax.nb201 default
  c.nb201.dataset = "cifar10"

  # log_every_steps, progress_bar, checkpoint.* (every_steps: plus at every epoch end and after
  # every prior update), debug.* (stop_after_steps, nan_at_step, signal_at_step, kill_at_step):
  # `run_lib.add_common_fields`.
  return run_lib.add_common_fields(c, checkpoint_every_steps=500, async_save=False)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` (a ValueError) naming a bad config value and the fix."""
  s = config.search
  if s.eval_bn not in ("batch", "running"):
    raise errors.ConfigError(f"config.search.eval_bn={s.eval_bn!r}; use 'batch' or 'running'")
  if s.penalty_mode not in PENALTY_MODES:
    raise errors.ConfigError(f"config.search.penalty_mode={s.penalty_mode!r}; use one of "
                             f"{PENALTY_MODES}")
  for name in ("init_channels", "num_cells"):
    if not int(config.model[name]) >= 1:
      raise errors.ConfigError(f"config.model.{name}={config.model[name]} must be >= 1")
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
  if config.curvature.get("cpu_opt_level", 3) not in (0, 1, 2, 3):
    raise errors.ConfigError(f"config.curvature.cpu_opt_level={config.curvature.cpu_opt_level!r}; "
                             "use an XLA backend optimisation level 0-3 (3: XLA's default)")
  if config.curvature.num_batches < 1:
    raise errors.ConfigError("config.curvature.num_batches must be >= 1")
  config_files.check_batch_sizes({"search.batch_size": config.search.batch_size,
                                  "search.eval_batch_size": config.search.eval_batch_size},
                                 jax.device_count())
  config_files.check_batch_sizes({"curvature.batch_size": curvature_batch_size(config)},
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
  for name in ("remat", "param_free_bn", "pool_bn"):
    if not isinstance(config.model.get(name, False), bool):
      raise errors.ConfigError(f"config.model.{name}={config.model[name]!r}; use True or False")
  run_lib.check_common_fields(config)
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


def curvature_scale(config: ml_collections.ConfigDict) -> float:
  """``bayes.curvature_scale``, with -1 meaning ``search.batch_size`` (module docstring of
  `bnas_jax.search`)."""
  scale = float(config.bayes.curvature_scale)
  return float(config.search.batch_size) if scale < 0 else scale


def curvature_batch_size(config: ml_collections.ConfigDict) -> int:
  """``curvature.batch_size``, with -1 meaning ``search.batch_size``."""
  b = int(config.curvature.batch_size)
  return int(config.search.batch_size) if b < 0 else b


# Config fields that may change when a run resumes from its checkpoints (prefix match); any other
# difference is refused, because it would not match the checkpointed state or its data position.
RESUME_SAFE_FIELDS = run_lib.COMMON_RESUME_SAFE_FIELDS + (
    "search.iterations", "nb201.table", "model.dw_impl", "model.edge_loop", "model.pruned_ops",
    "model.remat", "search.compile_ahead")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Opens every file and folder `config` names; run before the workdir is created.

  The data (`bnas_jax.data.dataset.check_data`: the data folder and every file of its layout) and, in
  the nb201 space, the NAS-Bench-201 table (`load_nb201_table`). Logs nothing.

  Raises:
    dataset.DatasetError: missing or unreadable data (naming config.data.data_dir).
    errors.ConfigError: a named NAS-Bench-201 table that is missing or cannot be loaded, or an
      unknown config.nb201.dataset.
  """
  dataset_lib.check_data(config.data)
  load_nb201_table(config, log=False)


def load_nb201_table(config: ml_collections.ConfigDict, *, log: bool = True):
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
