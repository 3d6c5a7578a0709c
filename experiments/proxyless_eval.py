r"""Retraining a tree cell in the PyramidNet backbone on CIFAR-10 (proxyless spec 5).

PyramidNet (N = 18 blocks per stage, alpha = 84, G = 2) with the tree cell ``config.genotype`` in
every block: a registered cell (``tree_cell_a`` = 5,724,330 parameters, ``tree_cell_b`` =
5,588,850, ``plain`` = the plain grouped-conv PyramidNet) or the ``genotype.json`` a proxyless
search wrote (``experiments/proxyless_cifar10.py``). The retraining runner is `bnas_jax.train_eval`
(``config.model.backbone = 'pyramidnet'`` selects `bnas_jax.models.pyramidnet`).

Recipe (spec 5.1-5.3): 600 epochs on the 50k training images, batch 64, SGD momentum 0.9, lr 0.1
with cosine decay to 0, weight decay 1e-4 on all parameters, no gradient clipping, no auxiliary
head, no label smoothing, crop + flip + cutout 16 (1 hole), DropPath on every branch of every tree
node. Published (spec 6): path-level EAS TreeCell-A + DropPath + cutout 2.49 % at 5.7 M;
BayesNAS + TreeCell-A + Pyramid + cutout 2.41 % at 3.4 M.

The cosine is stepped per iteration (``train.lr_schedule = 'cosine_step'``) and the momentum is
Nesterov's (``train.nesterov``), as spec 5 says. Deviation of the runner from spec 5 (documented):
the DropPath rate rises linearly from 0 to ``train.drop_prob`` over the epochs (the DARTS schedule
of the runner; the spec's rate is not recorded, 0.1 here is a guess).

Run::

  python -m bnas_jax.main --config experiments/proxyless_eval.py --workdir /tmp/bnas/pyr_a
  python -m bnas_jax.main --config experiments/proxyless_eval.py --workdir /tmp/bnas/pyr_mine \
      --config.genotype /tmp/bnas/proxyless/genotype.json

Variants (``:name``): ``cpu`` (N = 2, alpha = 24, 3 epochs on 5,000 images, batch 50, no cutout or
DropPath: minutes per epoch on a 2-core CPU) and ``tiny`` (N = 1, alpha = 0: widths 16, 2 epochs of
a few steps on the lossless subset: smoke tests).
"""

from bnas_jax import train_eval


def get_config(arg=None):
  """The PyramidNet retraining config; `arg` selects a variant (None, 'cpu' or 'tiny')."""
  config = train_eval.default_config()
  config.genotype = "tree_cell_a"
  config.model.backbone = "pyramidnet"
  config.model.init_channels = 16  # not used by the PyramidNet (its stem is 16 wide)
  config.model.num_cells = 18  # N, blocks per stage
  config.model.alpha = 84.0
  config.model.groups = 2
  config.model.auxiliary = False
  config.data.name = "cifar10"
  config.data.cutout = 16
  config.train.epochs = 600
  config.train.batch_size = 64
  config.train.eval_batch_size = 500
  config.train.lr = 0.1
  config.train.lr_min = 0.0
  config.train.lr_schedule = "cosine_step"
  config.train.momentum = 0.9
  config.train.nesterov = True
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 0.0
  config.train.drop_prob = 0.1
  config.train.aux_weight = 0.0
  config.train.label_smoothing = 0.0
  config.train.eval_every_epochs = 10

  if arg in (None, ""):
    return config
  if arg == "cpu":
    config.model.num_cells = 2
    config.model.alpha = 24.0
    config.data.train_examples = 5_000
    config.data.cutout = 0
    config.train.epochs = 3
    config.train.batch_size = 50
    config.train.eval_batch_size = 1000
    config.train.drop_prob = 0.0
    config.train.eval_every_epochs = 1
    config.log_every_steps = 20
    return config
  if arg == "tiny":
    config.model.num_cells = 1
    config.model.alpha = 0.0
    config.data.num_train = 4_000  # the lossless subset
    config.data.num_test = 1_000
    config.data.train_examples = 64
    config.data.cutout = 0
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.eval_batch_size = 250
    config.train.drop_prob = 0.2
    config.train.eval_every_epochs = 1
    config.log_every_steps = 1
    for field in ("progress_bar", "progress"):
      if field in config:
        config[field] = False
    return config
  raise ValueError(f"unknown variant {arg!r} of experiments/proxyless_eval.py; use '', 'cpu' or "
                   "'tiny'")
