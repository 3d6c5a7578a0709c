r"""Retraining a discovered cell on CIFAR-10 with the DARTS protocol (spec 7.3).

20 cells, C = 36, 600 epochs, batch 96, SGD lr 0.025 (cosine to 0), momentum 0.9, weight decay 3e-4,
gradient clip 5, cutout 16, drop path / channel dropout 0.2 (rising linearly), auxiliary head
weight 0.4; the test error is reported at the end (``<workdir>/results.json``).

Run::

  python -m bnas_jax.main --config experiments/cifar_eval.py --workdir /tmp/bnas/eval
  python -m bnas_jax.main --config experiments/cifar_eval.py --workdir /tmp/bnas/eval_v2 \
      --config.genotype darts_v2
  python -m bnas_jax.main --config experiments/cifar_eval.py --workdir /tmp/bnas/eval_mine \
      --config.genotype /tmp/bnas/proxy/genotype.json
  make train EXP=cifar_eval

``config.genotype``: a registered name (bayesnas_0.01 / 0.007 / 0.005, darts_v1, darts_v2,
pc_darts, drnas, gdas_v1) or a genotype JSON path written by a search.

Variants (``:name``):

* ``cpu``: a small network (5 cells, C = 8, no aux head, no cutout / drop path) trained for 3
  epochs on the first 5,000 training images with batch 50 and lr 0.05, evaluated on the full
  10,000-image test set after every epoch (a CPU run).
* ``tiny``: 2 cells, C = 4, 2 epochs of 4 steps on 64 images of the lossless CIFAR-10 subset
  (``--config.data.data_dir ~/.cache/bnas_jax/cifar10-lossless-subset``), evaluated on its 1,000
  test images: mostly compilation, then seconds of training (smoke tests; then
  ``python -m bnas_jax.evaluate --workdir DIR``).
"""

from bnas_jax import train_eval


def get_config(arg=None):
  """The CIFAR-10 retraining config; `arg` selects a variant (None, 'cpu' or 'tiny')."""
  config = train_eval.default_config()
  config.genotype = "bayesnas_0.01"
  config.data.name = "cifar10"
  config.data.cutout = 16
  if arg in (None, ""):
    return config
  if arg == "cpu":
    config.model.init_channels = 8
    config.model.num_cells = 5
    config.model.auxiliary = False
    config.data.train_examples = 5_000
    config.data.cutout = 0
    config.train.epochs = 3
    config.train.batch_size = 50
    config.train.eval_batch_size = 1000
    config.train.lr = 0.05
    config.train.drop_prob = 0.0
    config.log_every_steps = 20
    return config
  if arg == "tiny":
    # Seconds of training on a CPU after the compilations (smoke tests, the `python -m
    # bnas_jax.evaluate` walkthrough; not a meaningful run): on the lossless 4,000 / 1,000 CIFAR-10
    # subset (``make data-shared``).
    config.model.init_channels = 4
    config.model.num_cells = 2  # both cells are reductions
    config.model.auxiliary = False
    config.data.num_train = 4_000
    config.data.num_test = 1_000
    config.data.train_examples = 64
    config.data.cutout = 0
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.eval_batch_size = 250
    config.train.drop_prob = 0.0
    config.log_every_steps = 1
    config.progress_bar = False
    return config
  raise ValueError(f"unknown variant {arg!r} of experiments/cifar_eval.py; use '', 'cpu' or "
                   "'tiny'")
