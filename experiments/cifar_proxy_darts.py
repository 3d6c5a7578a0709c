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

import importlib.util
import os


def _proxy_module():
  """experiments/cifar_proxy.py, loaded by path (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar_proxy.py")
  spec = importlib.util.spec_from_file_location("bnas_experiments_cifar_proxy", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  """The DARTS-space proxy-search config; `arg` selects a variant (None or 'cpu').

  The protocol, splits and the ``cpu`` variant are those of ``cifar_proxy.py``; only the space and
  the full-size width (DARTS search: C = 16) differ.
  """
  if arg not in (None, "", "cpu"):
    raise ValueError(f"unknown variant {arg!r} of experiments/cifar_proxy_darts.py; use '' or 'cpu'")
  config = _proxy_module().get_config(arg)
  config.space = "darts"
  if arg in (None, ""):
    config.model.init_channels = 16
  return config
