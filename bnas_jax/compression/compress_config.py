"""Configuration of ``mode='compress'`` runs: defaults, checks before any work, the network and the
data a config names (the loop is `bnas_jax.compression.runner`)."""

from __future__ import annotations

import os

import ml_collections
from bnas_jax import errors
from bnas_jax import run_lib
from bnas_jax.compression import baselines
from bnas_jax.compression import export
from bnas_jax.compression import groups
from bnas_jax.compression import networks
from bnas_jax.compression import train
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import idx
from bnas_jax.data import readers


METHODS = ("bayesnas", "group_lasso", "l1_filter", "random", "dense")
DATA_SOURCES = ("idx_t10k_split", "idx", "tfds", "cifar_local")
RESULT_JSON = "result.json"
RESUME_SAFE_FIELDS = run_lib.COMMON_RESUME_SAFE_FIELDS + ("pretrained_dir",)


def default_config() -> ml_collections.ConfigDict:
  """Every field of a compression config (LeNet-5-Caffe on the 8,000 / 2,000 MNIST split)."""
  c = ml_collections.ConfigDict()
  c.mode = "compress"
  c.seed = 0
  c.method = "bayesnas"
  c.model = ml_collections.ConfigDict()
  c.model.name = "lenet5"
  c.model.padding = "VALID"  # lenet5 only; 'SAME' = the released SBP script
  c.model.caffe_exact = False  # lenet5 only: no ReLU after the convs
  c.model.scale = 1.0  # vgg_like only: width multiplier
  c.data = ml_collections.ConfigDict()
  c.data.source = "idx_t10k_split"  # 'idx' (4 IDX files), 'tfds', 'cifar_local'
  c.data.name = "mnist"  # 'mnist' | 'fashion_mnist' | 'cifar10'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.split_train = 8_000  # idx_t10k_split: images of the t10k files used for training
  c.data.split_test = 2_000
  c.data.num_val = 1_000  # held out of the training images for selection (spec 4.1)
  c.data.seed = 0
  c.pretrained_dir = ""  # an exported dense network (a run's pretrained/ folder): no pretraining
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.epochs = 10
  c.pretrain.batch_size = 128
  c.pretrain.lr = 1e-3
  c.pretrain.weight_decay = 0.0
  c.pretrain.dropout = True  # the network's pretraining dropout (SBP's; LeNets have none)
  c.compress = ml_collections.ConfigDict()
  c.compress.iterations = 10  # T outer iterations
  c.compress.epochs_per_iteration = 1  # E_in
  c.compress.batch_size = 128
  c.compress.lr = 1e-3  # weights (Adam)
  c.compress.weight_decay = 1e-4  # kernels and BN scales (spec 3.4)
  c.compress.switch_optimizer = "adam"  # 'adam' (10x the weights' lr, spec 3.2) or 'sgd'
  c.compress.switch_lr = 1e-2
  c.compress.switch_momentum = 0.9  # sgd only
  c.compress.penalty_mode = "subgradient"  # or 'proximal' (sgd only)
  c.compress.lam = 1e-3  # lambda, for the mean-CE loss; sweep it (spec 3.4, 7.3)
  c.compress.lambda_ramp = 0.15  # fraction of the iterations over which lambda ramps up
  c.compress.prune_threshold = 1e-4  # gamma < this x the layer's median live gamma: dead
  # 'gamma': prune on the gamma threshold and |s| < eps_s only; 'posterior': also when the Laplace
  # posterior of the switch does not exclude 0 at one standard deviation (train.prior_step).
  c.compress.prune_rule = "posterior"
  # Per-group strength lambda_g = lambda m_g with m_g the group's MAC ('macs') or weight
  # ('weights') cost over the mean group cost (groups.cost_weights); for bayesnas and group_lasso
  # alike. 'none': one lambda for every group.
  c.compress.cost_weighting = "none"
  c.compress.eps_s = 1e-2  # |s| < eps_s: dead (Adam steps of 1e-2 hover around 0)
  c.compress.curvature = "ggn_fast"
  c.compress.curvature_batches = 20  # M
  c.compress.curvature_batch_size = 128
  # A prior update (no pruning) on the pretrained network before the first epoch, so that omega
  # starts from its curvature (about sqrt(h / lambda)) instead of spec 3.2's omega = 1, under which
  # the first epoch is a plain group lasso at strength lambda (docs/compression.md).
  c.compress.initial_update = True
  c.finetune = ml_collections.ConfigDict()
  c.finetune.epochs = 3  # F
  c.finetune.batch_size = 128
  c.finetune.lr = 1e-4
  c.finetune.weight_decay = 0.0
  c.baseline = ml_collections.ConfigDict()
  c.baseline.ratio = 0.5  # l1_filter: fraction of the units of each layer removed
  c.baseline.kept = ""  # random: the kept structure to draw (e.g. '5-10-76-16')
  run_lib.add_common_fields(c, checkpoint_every_steps=-1, async_save=False)
  c.log_every_steps = 100
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` naming the first bad field (before anything is created)."""
  run_lib.check_common_fields(config)
  c = config
  if c.method not in METHODS:
    raise errors.ConfigError(f"config.method={c.method!r}; choose one of {METHODS}")
  if c.data.source not in DATA_SOURCES:
    raise errors.ConfigError(f"config.data.source={c.data.source!r}; choose one of {DATA_SOURCES}")
  try:
    make_arch(c)
  except ValueError as e:
    raise errors.ConfigError(f"config.model: {e}") from None
  for name, v in (("pretrain.epochs", c.pretrain.epochs), ("finetune.epochs", c.finetune.epochs)):
    if int(v) < 0:
      raise errors.ConfigError(f"config.{name}={v} must be >= 0")
  if int(c.compress.iterations) < 1 or int(c.compress.epochs_per_iteration) < 1:
    raise errors.ConfigError("config.compress.iterations and compress.epochs_per_iteration must "
                             "be >= 1")
  if c.method != "dense" and not c.pretrained_dir and int(c.pretrain.epochs) < 1:
    raise errors.ConfigError("config.pretrain.epochs must be >= 1 unless config.pretrained_dir "
                             "names a pretrained network")
  if not float(c.compress.lam) > 0:
    raise errors.ConfigError(f"config.compress.lam={c.compress.lam} must be > 0")
  if c.compress.penalty_mode not in train.PENALTY_MODES:
    raise errors.ConfigError(f"config.compress.penalty_mode={c.compress.penalty_mode!r}; choose "
                             f"one of {train.PENALTY_MODES}")
  try:
    train.make_step_fns(make_arch(c), step_config(c, "compress"))
  except ValueError as e:
    raise errors.ConfigError(f"config.compress: {e}") from None
  if c.compress.prune_rule not in train.PRUNE_RULES:
    raise errors.ConfigError(f"config.compress.prune_rule={c.compress.prune_rule!r}; choose one "
                             f"of {train.PRUNE_RULES}")
  if c.compress.cost_weighting not in groups.COST_WEIGHTINGS:
    raise errors.ConfigError(f"config.compress.cost_weighting={c.compress.cost_weighting!r}; "
                             f"choose one of {groups.COST_WEIGHTINGS}")
  if not 0.0 <= float(c.baseline.ratio) < 1.0:
    raise errors.ConfigError(f"config.baseline.ratio={c.baseline.ratio} must be in [0, 1)")
  if c.method == "random":
    arch = make_arch(c)
    try:
      baselines.parse_structure(arch, c.baseline.kept)
    except ValueError as e:
      raise errors.ConfigError(f"config.baseline.kept: {e}") from None
  for name in ("pretrain.batch_size", "compress.batch_size", "finetune.batch_size",
               "compress.curvature_batch_size"):
    node, leaf = name.split(".")
    if int(c[node][leaf]) < 1:
      raise errors.ConfigError(f"config.{name} must be >= 1")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Checks that the data folder and the pretrained network the config names exist."""
  c = config
  if c.pretrained_dir and not os.path.exists(os.path.join(c.pretrained_dir,
                                                          export.STRUCTURE_JSON)):
    raise errors.ConfigError(f"config.pretrained_dir={c.pretrained_dir!r} holds no "
                             f"{export.STRUCTURE_JSON}; point it at a run's pretrained/ folder")
  if c.data.source in ("idx_t10k_split", "idx") and not (c.data.data_dir and os.path.isdir(
      c.data.data_dir)):
    raise dataset_lib.DatasetNotFoundError(
        f"config.data.data_dir={c.data.data_dir!r} is not a folder; pass the folder of the MNIST "
        "IDX files (e.g. ../shared/data/mnist-t10k)")


def make_arch(config) -> networks.Arch:
  """The full network of ``config.model``."""
  m = config.model
  if m.name == "lenet5":
    return networks.get_arch("lenet5", padding=m.padding, caffe_exact=bool(m.caffe_exact))
  if m.name == "vgg_like":
    return networks.get_arch("vgg_like", scale=float(m.scale))
  return networks.get_arch(m.name)


def load_data(config) -> train.Data:
  """The train / val / test `train.Data` of ``config.data``."""
  d = config.data
  if d.source == "idx_t10k_split":
    ds = idx.load_test_split(d.data_dir, (d.split_train, d.split_test), d.seed, d.name)
  elif d.source == "idx":
    ds = idx.load_folder(d.data_dir, d.name)
  elif d.source == "tfds":
    ds = idx.load_tfds(d.name, d.data_dir) if d.name in idx.NAMES else readers.load_tfds(
        d.name, d.data_dir)
  else:
    ds = readers.load_local(d.name, d.data_dir)
  cifar = ds.image_shape[-1] == 3
  return train.make_data(ds, int(d.num_val), int(d.seed),
                         normalisation="channel" if cifar else "mean_image", augment=cifar)


def step_config(config, kind: str) -> train.StepConfig:
  """The step-function settings of stage `kind` ('pretrain', 'compress' or 'finetune')."""
  c = config
  if kind == "pretrain":
    return train.StepConfig(lr=float(c.pretrain.lr), weight_decay=float(c.pretrain.weight_decay),
                            train_bn=True, dropout=bool(c.pretrain.dropout))
  if kind == "compress":
    return train.StepConfig(lr=float(c.compress.lr), weight_decay=float(c.compress.weight_decay),
                            switch_optimizer=c.compress.switch_optimizer,
                            switch_lr=float(c.compress.switch_lr),
                            switch_momentum=float(c.compress.switch_momentum),
                            penalty_mode=c.compress.penalty_mode, train_bn=False, dropout=False)
  return train.StepConfig(lr=float(c.finetune.lr), weight_decay=float(c.finetune.weight_decay),
                          train_bn=False, dropout=False)


def batch_size(config, kind: str) -> int:
  """The batch size of stage `kind`."""
  return int(config[kind].batch_size)
