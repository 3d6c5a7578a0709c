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

from bnas_jax import config_files


def get_config(arg=None):
  """The DARTS-space proxy-search config; `arg` selects a variant (None or 'cpu').

  The protocol, splits and the ``cpu`` variant are those of ``cifar_proxy.py``; only the space and
  the full-size width (DARTS search: C = 16) differ.
  """
  if arg not in (None, "", "cpu"):
    raise ValueError(f"unknown variant {arg!r} of experiments/cifar_proxy_darts.py; use '' or 'cpu'")
  config = config_files.load_sibling(__file__, "cifar_proxy").get_config(arg)
  config.space = "darts"
  if arg in (None, ""):
    config.model.init_channels = 16
  return config
