r"""Training a discovered cell on ImageNet, mobile setting (spec 7.4; DARTS train_imagenet.py).

14 cells, C = 48, 224x224 inputs with the DARTS ImageNet stem; 250 epochs, batch 128, SGD lr 0.1
decayed by 0.97 per epoch, momentum 0.9, weight decay 3e-5, gradient clip 5, label smoothing 0.1,
auxiliary head weight 0.4, no drop path (the released BayesNAS ImageNet model: drop prob 0).
Augmentation: RandomResizedCrop 224 + flip + brightness/contrast/saturation jitter 0.4 (the hue
term of DARTS' ColorJitter is omitted); test: resize 256, centre crop 224.

Data: TFDS ``imagenet2012`` in the array_record format. It cannot be downloaded automatically:
put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org in
<manual_dir>, run ``tfds build imagenet2012 --manual_dir <manual_dir> --data_dir <data_dir>
--file_format array_record``, then::

  python -m bnas_jax.main --config experiments/imagenet_eval.py --workdir /tmp/bnas/imagenet \
      --config.data.data_dir <data_dir> [--config.genotype bayesnas_0.005]
"""

from bnas_jax import train_eval


def get_config(arg=None):
  """The ImageNet mobile-setting config (no variants)."""
  if arg not in (None, ""):
    raise ValueError(f"experiments/imagenet_eval.py has no variant {arg!r}")
  config = train_eval.default_config()
  config.genotype = "bayesnas_0.01"
  config.data.name = "imagenet2012"
  config.data.source = "tfds"
  config.data.cutout = 0
  config.model.init_channels = 48
  config.model.num_cells = 14
  config.model.auxiliary = True
  config.train.epochs = 250
  config.train.batch_size = 128
  config.train.eval_batch_size = 250
  config.train.lr = 0.1
  config.train.lr_schedule = "exponential"
  config.train.lr_decay = 0.97
  config.train.weight_decay = 3e-5
  config.train.grad_clip = 5.0
  config.train.drop_prob = 0.0
  config.train.label_smoothing = 0.1
  config.train.aux_weight = 0.4
  config.checkpoint.every_steps = 2000
  config.log_every_steps = 100
  return config
