r"""BayesNAS search in the NAS-Bench-201 space on CIFAR-100 (see ``nb201_cifar10.py``).

The accuracies looked up are NAS-Bench-201's CIFAR-100 validation accuracies. CIFAR-100 is not in
shared/: point ``--config.data.data_dir`` at a ``cifar-100-binary`` or ``cifar-100-python`` folder
(or use ``--config.data.source=tfds``).

Run::

  python -m bnas_jax.main --config experiments/nb201_cifar100.py --workdir /tmp/bnas/nb201_c100

Variants: ``cpu``.
"""

import importlib.util
import os


def _nb201_cifar10():
  # Config files are loaded by path (not as a package): import the sibling file the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nb201_cifar10.py")
  spec = importlib.util.spec_from_file_location("_bnas_nb201_cifar10_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  """NB201-space search config on CIFAR-100; `arg` selects a variant (None or 'cpu')."""
  return _nb201_cifar10().nb201_config("cifar100", arg)
