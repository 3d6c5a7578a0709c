r"""BayesNAS search in the NAS-Bench-201 space on CIFAR-100 (see ``nb201_cifar10.py``).

The accuracies looked up are NAS-Bench-201's CIFAR-100 validation accuracies. CIFAR-100 is not in
shared/: point ``--config.data.data_dir`` at a ``cifar-100-binary`` or ``cifar-100-python`` folder
(or use ``--config.data.source=tfds``).

Run::

  python -m bnas_jax.main --config experiments/nb201_cifar100.py --workdir /tmp/bnas/nb201_c100

Variants: ``cpu``.
"""

from bnas_jax import config_files


def get_config(arg=None):
  """NB201-space search config on CIFAR-100; `arg` selects a variant (None or 'cpu')."""
  return config_files.load_sibling(__file__, "nb201_cifar10").nb201_config("cifar100", arg)
