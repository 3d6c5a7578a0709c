r"""The proxyless search on CIFAR-10: PyramidNet with a switched tree cell (proxyless spec 4).

BayesNAS's best CIFAR-10 result ("BayesNAS + TreeCell-A + Pyramid backbone + cutout": 2.41 % test
error, 3.4 M parameters; path-level EAS's TreeCell-A: 2.49 %, 5.7 M) comes from a search in this
space. The supernet (`bnas_jax.models.tree_supernet`) is the additive bottleneck PyramidNet
(N = 18 blocks per stage, alpha = 84, G = 2) whose every block holds the complete binary depth-3
tree: 2 fixed root edges (the block's grouped 3 x 3 conv), 4 + 8 searched edges with the 7
path-level candidates each (sep 3/5/7, conv 1 x 1, identity, max/avg pool 3 x 3), an origin switch
per edge, add (mean) merges; one switch group over the 54 blocks (spec 4.3.5). The runner, prior
update, curvature kinds and pruning are the cell search's (`bnas_jax.search`); the found cell is a
`bnas_jax.search_space.tree.TreeCell` written to ``<workdir>/genotype.json`` (+ ``genotype.png``)
and retrained by ``experiments/proxyless_eval.py``.

Run::

  python -m bnas_jax.main --config experiments/proxyless_cifar10.py --workdir /tmp/bnas/proxyless
  python -m bnas_jax.main --config experiments/proxyless_cifar10.py:cpu \
      --workdir /tmp/bnas/proxyless_cpu \
      --config.data.data_dir ~/.cache/bnas_jax/cifar-10-batches-bin

Variants (``:name``):

* (none): the full supernet (17.5 M parameters) on 5k warm-up / 40k search / 5k val images,
  batch 64, T = 3. Needs a GPU.
* ``cpu``: N = 1 block per stage, alpha = 0 (width 16 everywhere), stem 16, on 256 / 512 / 256
  images, batch 32, T = 3, the prior calibrated for 16 switch steps per epoch (see the variant's
  comments); for a 2-core CPU (the command and its wall time are in docs/proxyless.md).
* ``tiny``: the ``tree_tiny`` space (6 searched edges) on 3 blocks of width 8, 8 + 8 + 8 images of
  the lossless subset: smoke tests and CI.
"""

from bnas_jax import search


def get_config(arg=None):
  """The proxyless-search config; `arg` selects a variant (None, 'cpu' or 'tiny')."""
  config = search.default_config()
  config.space = "tree"
  config.model.init_channels = 16  # the PyramidNet stem width
  config.model.num_cells = 18  # N, blocks per stage
  config.model.alpha = 84.0
  config.model.groups = 2
  config.data.name = "cifar10"
  config.data.splits.warmup = 5_000
  config.data.splits.search = 40_000
  config.data.splits.val = 5_000
  config.data.cutout = 16
  config.search.warmup_epochs = 1
  config.search.iterations = 3
  config.search.batch_size = 64
  config.search.eval_batch_size = 500
  config.bayes.prune_mode = "relative"
  config.bayes.prune_threshold = 0.1
  # One op per edge in the exported cell (the surviving op with the largest gamma), as path-level
  # cells have; the uncapped survivors go to genotype_survivors.json when they differ.
  config.genotype.max_ops = 1
  config.checkpoint.every_steps = 500

  if arg in (None, ""):
    return config
  if arg == "cpu":
    # Speed: 3 blocks of width 16 (no widening) = 3 distinct block shapes, each block's 12
    # searched edges one scanned body (models/tree_supernet.py); compile the evaluation and the
    # curvature pass (and, after a prune, the next train step) in background threads.
    config.model.num_cells = 1
    config.model.alpha = 0.0
    config.search.compile_ahead = True
    config.data.splits.warmup = 256
    config.data.splits.search = 512
    config.data.splits.val = 256
    config.search.iterations = 3
    config.search.batch_size = 32
    config.search.eval_batch_size = 128
    config.curvature.num_batches = 2
    config.curvature.batch_size = 16
    # Calibration of the prior for 3 search epochs of 16 switch steps (the GPU search has ~600
    # per epoch). With the defaults (switch lr 0.1, lambda 0.01 for both kinds) the switches move
    # by ~0.05 per epoch and the gammas of all 96 groups stay within a factor ~2 of each other
    # after T = 2 (no group below 0.1 of the median: nothing pruned). So:
    # * switch_lr x 8: the penalty's curvature-weighted shrinkage (lambda * omega per step, omega
    #   from the curvature) and the data gradient act over 16 steps as over ~130; their balance
    #   (lambda * omega ~ the data gradient per switch) is unchanged;
    # * lambda_origin = lambda_op / 2: an origin switch scales its edge's 7 candidates and its
    #   subtree, so its curvature is ~10-100x an op's and its omega saturates at
    #   sqrt(n / gamma); at the op lambda it shrinks fastest and, through the series variance
    #   that caps every op's gamma at its origin's, would flatten the op gammas of its edge;
    # * prune_threshold = 0.2 of the median live gamma (per kind): replaying the prior update on
    #   the curvature and switches of a default-calibrated run predicts no pruning at t = 1 and
    #   ~6 op groups (the pools and identity, whose curvature and omega are the largest) at t = 2.
    config.search.switch_lr = 0.8
    config.bayes.lambda_origin = 0.005
    config.bayes.lambda_op = 0.01
    config.bayes.prune_threshold = 0.2
    config.checkpoint.every_steps = 50
    config.log_every_steps = 10
    return config
  if arg == "tiny":
    config.space = "tree_tiny"
    config.model.init_channels = 8
    config.model.num_cells = 1
    config.model.alpha = 0.0
    config.data.num_train = 4_000  # the lossless subset
    config.data.num_test = 1_000
    config.data.splits.warmup = 8
    config.data.splits.search = 8
    config.data.splits.val = 8
    config.search.iterations = 2
    config.search.batch_size = 4
    config.search.eval_batch_size = 4
    config.curvature.num_batches = 2
    config.bayes.prune_threshold = 0.9  # prunes at t = 1 (exercises the mask rebuild)
    config.checkpoint.every_steps = 1
    config.checkpoint.max_to_keep = 2
    config.log_every_steps = 1
    config.progress_bar = False
    return config
  raise ValueError(f"unknown variant {arg!r} of experiments/proxyless_cifar10.py; use '', 'cpu' "
                   "or 'tiny'")
