r"""The VGG-like CIFAR-10 network (compression spec 1.3) compressed by the HARD prior, or a baseline.

Variants (``experiments/compress_vgg_like.py:<variant>``):

* ``full`` (default): the published networks' setting: width scale 1 (14,991,946 params,
  313,463,808 MACs), CIFAR-10 50,000 / 10,000 with 5,000 training images held out for selection
  (spec 4.1), pad-4 crop + flip, 200 epochs of dense pretraining with SBP's dropout (spec 1.3,
  6.1), T = 60 outer iterations of one epoch with batch norm frozen and no dropout (spec 3.2),
  20 fine-tuning epochs. For a GPU; ``--config.data.data_dir`` is the folder holding
  ``cifar-10-batches-bin`` (``make data-shared`` builds it from ../shared/data).
* ``cpu``: width scale 1/8 and 2 pretraining epochs, T = 2, 1 fine-tuning epoch: a smoke run on
  a CPU, not a benchmark.

Run::

  python -m bnas_jax.main --config experiments/compress_vgg_like.py --workdir runs/compress_vgg \
      --config.data.data_dir ~/.cache/bnas_jax
"""

from bnas_jax.compression import runner


def get_config(arg=None):
  """`arg`: None / 'full' or 'cpu'."""
  variant = arg or "full"
  if variant not in ("full", "cpu"):
    raise ValueError(f"unknown variant {arg!r} of experiments/compress_vgg_like.py; use full or cpu")
  c = runner.default_config()
  c.model.name = "vgg_like"
  c.data.source = "cifar_local"
  c.data.name = "cifar10"
  c.data.num_val = 5_000
  c.pretrain.batch_size = c.compress.batch_size = c.finetune.batch_size = 100
  c.pretrain.weight_decay = 5e-4
  c.compress.curvature_batch_size = 100
  if variant == "full":
    c.model.scale = 1.0
    c.pretrain.epochs = 200
    c.compress.iterations = 60
    c.finetune.epochs = 20
    return c
  c.model.scale = 0.125
  c.pretrain.epochs = 2
  c.compress.iterations = 2
  c.compress.curvature_batches = 4
  c.finetune.epochs = 1
  return c
