r"""A tiny search that runs in seconds on a CPU: smoke tests and CI (not a meaningful search).

The nb201 space (default) or the bayesnas space (``:bayesnas``) with C = 4 and 1 cell per stage
(nb201) / 3 cells (bayesnas), on 8 + 8 + 8 training images of the lossless CIFAR-10 subset in
batches of 4: 1 warm-up epoch and 2 outer iterations of 2 steps each, a checkpoint after every step.

Run (``make data-shared`` first builds the subset from ../shared/data)::

  python -m bnas_jax.main --config experiments/tiny.py --workdir /tmp/bnas/tiny \
      --config.data.data_dir ~/.cache/bnas_jax/cifar10-lossless-subset
"""

from bnas_jax import search


def get_config(arg=None):
  """Tiny search config; `arg` = None / 'nb201' or 'bayesnas' or 'darts' (the search space)."""
  space = arg or "nb201"
  if space not in ("nb201", "bayesnas", "darts"):
    raise ValueError(f"unknown variant {arg!r} of experiments/tiny.py; use nb201, bayesnas, darts")
  config = search.default_config()
  config.space = space
  config.model.init_channels = 4
  config.model.num_cells = 1 if space == "nb201" else 3
  config.data.name = "cifar10"
  config.data.num_train = 4_000  # the lossless subset (data_batch_1 first 4,000 / test 1,000)
  config.data.num_test = 1_000
  config.data.splits.warmup = 8
  config.data.splits.search = 8
  config.data.splits.val = 8
  config.data.cutout = 16
  config.search.warmup_epochs = 1
  config.search.iterations = 2
  config.search.batch_size = 4
  if space == "darts":
    # DARTS' weight lr: at 0.1 this 4-channel net on batches of 4 diverges within 4 steps (loss
    # 1e4-1e7, then a non-finite curvature), with either supernet formulation.
    config.search.lr = 0.025
  config.search.eval_batch_size = 4
  config.curvature.num_batches = 2
  config.bayes.prune_mode = "relative"
  config.bayes.prune_threshold = 0.9  # prunes a few op groups at t = 1 (exercises the mask rebuild)
  config.nb201.dataset = "cifar10"
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = 2
  config.log_every_steps = 1
  config.progress_bar = False
  return config
