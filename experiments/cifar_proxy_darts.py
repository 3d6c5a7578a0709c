r"""BayesNAS search in the 14-edge DARTS space on CIFAR-10 (spec 9.1: what the paper claims).

Same protocol as ``experiments/cifar_proxy.py`` (batch 18, lr 0.1, lambda 0.01, disjoint 5k/40k/5k
splits, T = 3) but the DARTS cell: 14 edges (every earlier node into each of the 4 intermediate
nodes), the 7 DARTS ops (ReLU-Conv-BN, separable dil convs) plus an origin switch per edge, and the
DARTS search width C = 16 with 8 cells. Besides the BayesNAS genotype (every surviving op kept), the
run writes a DARTS-style export (top-2 input edges per node, one op each: ``genotype_darts.*``).

Run::

  python -m bnas_jax.main --config experiments/cifar_proxy_darts.py --workdir /tmp/bnas/darts

Variants: ``cpu`` (C = 8, 5 cells, 500/2,000/500 images, T = 2).
"""

from bnas_jax import search


def get_config(arg=None):
  """The DARTS-space proxy-search config; `arg` selects a variant (None or 'cpu')."""
  config = search.default_config()
  config.space = "darts"
  config.model.init_channels = 16
  config.model.num_cells = 8
  config.data.name = "cifar10"
  config.data.splits.warmup = 5_000
  config.data.splits.search = 40_000
  config.data.splits.val = 5_000
  config.data.cutout = 16
  config.search.iterations = 3
  config.search.batch_size = 18

  if arg in (None, ""):
    return config
  if arg == "cpu":
    config.model.init_channels = 8
    config.model.num_cells = 5
    config.data.splits.warmup = 500
    config.data.splits.search = 2_000
    config.data.splits.val = 500
    config.search.iterations = 2
    config.search.eval_batch_size = 100
    config.curvature.num_batches = 4
    config.checkpoint.every_steps = 100
    config.log_every_steps = 25
    return config
  raise ValueError(f"unknown variant {arg!r} of experiments/cifar_proxy_darts.py; use '' or 'cpu'")
