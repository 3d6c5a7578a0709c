r"""LeNet-5-Caffe compressed by the HARD prior (compression spec 1.2, 3.2), or a baseline.

Variants (``experiments/compress_lenet5.py:<variant>``):

* ``full`` (default): the published protocol's data, the four standard MNIST IDX files
  (60,000 / 10,000; the last 10,000 training images held out for selection, spec 4.1), 200
  epochs of dense pretraining (SBP's LeNet-5 schedule length, spec 6.1), T = 100 outer
  iterations of one epoch, 10 fine-tuning epochs. Point ``--config.data.data_dir`` at the folder
  of the IDX files (or use ``--config.data.source=tfds``). For a GPU.
* ``cpu``: the shared MNIST test files split 8,000 / 2,000 (seeded; 1,000 of the 8,000 held out
  for selection), 10 pretraining epochs, T = 4 (lambda ramped over all 4), 2 fine-tuning epochs: minutes on a CPU. Figures
  on this split are **not comparable** with published results, which train on 60,000 images.
* ``tiny``: 400 / 200 images, 1 pretraining epoch, T = 2, 1 fine-tuning epoch: tests and smoke runs.

``--config.method`` picks BayesNAS (``bayesnas``) or a baseline (``group_lasso``, ``l1_filter``,
``random``); ``--config.compress.lam`` the sparsity strength (sweep it: bench/compress_bench.py).

Run::

  python -m bnas_jax.main --config experiments/compress_lenet5.py:cpu --workdir runs/compress_lenet5 \
      --config.data.data_dir ../shared/data/mnist-t10k
"""

import os

from bnas_jax.compression import runner

# The MNIST test files of the project's shared data folder: $BNAS_SHARED, else <repo>/../shared.
SHARED_MNIST = os.path.join(
    os.environ.get("BNAS_SHARED")
    or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"),
    "data", "mnist-t10k")


def get_config(arg=None):
  """`arg`: None / 'full', 'cpu' or 'tiny'."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "tiny"):
    raise ValueError(f"unknown variant {arg!r} of experiments/compress_lenet5.py; use full, cpu "
                     "or tiny")
  c = runner.default_config()
  c.model.name = "lenet5"
  if variant == "full":
    c.data.source = "idx"
    c.data.num_val = 10_000
    c.pretrain.epochs = 200
    c.compress.iterations = 100
    c.finetune.epochs = 10
    return c
  c.data.source = "idx_t10k_split"
  c.data.data_dir = os.path.normpath(SHARED_MNIST)
  if variant == "cpu":
    c.pretrain.epochs = 10
    c.compress.iterations = 4
    c.finetune.epochs = 2
    c.compress.curvature_batches = 8
    # lambda ramps up over all T = 4 iterations (the default 15 % is no ramp at T = 4): pruning
    # is spread over the iterations, every method with a lambda gets the same schedule.
    c.compress.lambda_ramp = 1.0
    return c
  c.data.split_train, c.data.split_test, c.data.num_val = 400, 200, 100
  c.pretrain.epochs = 1
  c.pretrain.batch_size = c.compress.batch_size = c.finetune.batch_size = 50
  c.compress.iterations = 2
  c.compress.curvature_batches = 2
  c.compress.curvature_batch_size = 25
  c.compress.lam = 0.003  # prunes in every layer of the tiny run, collapses none
  c.compress.switch_lr = 0.1  # 12 switch steps in all: large enough for some to reach eps_s
  c.finetune.epochs = 1
  c.progress_bar = False
  c.log_every_steps = 2
  return c
