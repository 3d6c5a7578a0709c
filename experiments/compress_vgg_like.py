r"""The VGG-like CIFAR-10 network (compression spec 1.3) compressed by the HARD prior, or a baseline.

Variants (``experiments/compress_vgg_like.py:<variant>``):

* ``full`` (default): the published networks' setting: width scale 1 (14,991,946 params,
  313,463,808 MACs), CIFAR-10 50,000 / 10,000 with 5,000 training images held out for selection
  (spec 4.1), pad-4 crop + flip, 200 epochs of dense pretraining with SBP's dropout (spec 1.3,
  6.1), T = 60 outer iterations of one epoch with batch norm frozen and no dropout (spec 3.2),
  20 fine-tuning epochs. For a GPU; ``--config.data.data_dir`` is the folder holding
  ``cifar-10-batches-bin`` (``make data-shared`` builds it from ../shared/data).
* ``bench``: benchmark (b) (``bench/compress_bench.py``), a CPU benchmark, **not** the
  published protocol: width scale 1/8 (conv widths 8-64, FC 64; 236,562 params, 5,091,968
  MACs), the real CIFAR-10 (``data.data_dir``; unset: ``$BNAS_DATA_DIR`` or ``~/.cache/bnas_jax``)
  with the same 5,000 training images held out for selection, 7 epochs of dense pretraining
  without SBP's dropout (too strong at this width), T = 2 outer iterations of one epoch with
  lambda ramped over both (lambda / 2, lambda), the curvature on M = 10 batches of 100, 1
  fine-tuning epoch (L1-norm and random pruning: 3). Sized for about 10 minutes of pretraining
  and 4-5 minutes per compression run on 2 CPU cores; figures are not comparable with published
  full-width results.
* ``cpu``: width scale 1/8 and 2 pretraining epochs, T = 2, 1 fine-tuning epoch: a smoke run on
  a CPU, not a benchmark.

Run::

  python -m bnas_jax.main --config experiments/compress_vgg_like.py --workdir runs/compress_vgg \
      --config.data.data_dir ~/.cache/bnas_jax
  python bench/compress_bench.py --experiment experiments/compress_vgg_like.py --variant bench \
      --root runs/compress_vgg_bench     # benchmark (b); CIFAR-10 from the default data folder
"""

from bnas_jax.compression import runner


def get_config(arg=None):
  """`arg`: None / 'full', 'bench' or 'cpu'."""
  variant = arg or "full"
  if variant not in ("full", "bench", "cpu"):
    raise ValueError(f"unknown variant {arg!r} of experiments/compress_vgg_like.py; use full, "
                     "bench or cpu")
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
  if variant == "bench":
    c.pretrain.epochs = 7
    # No dropout: at width 1/8 (8-64 channels) SBP's rates of 0.3-0.5 leave the network near
    # chance after 2 epochs (validation error 85 %).
    c.pretrain.dropout = False
    c.compress.iterations = 2
    # lambda ramps up over both iterations (as compress_lenet5.py:cpu): every method with a
    # lambda gets the same schedule.
    c.compress.lambda_ramp = 1.0
    c.compress.curvature_batches = 10
    c.finetune.epochs = 1
    return c
  c.pretrain.epochs = 2
  c.compress.iterations = 2
  c.compress.curvature_batches = 4
  c.finetune.epochs = 1
  return c
