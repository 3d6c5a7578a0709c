"""ImageNet for the retraining (DARTS ``train_imagenet.py`` protocol): TFDS ``imagenet2012`` read
with random access, decoded and augmented on the host with PIL, one batch at a time.

With several processes, each process decodes only its own rows of every global batch
(`sharding.local_rows`) and the global batch is assembled from the processes' rows
(`sharding.shard_batch`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.data import pipeline
from bnas_jax.data import sharding as sharding_lib
from bnas_jax.data.dataset import DatasetNotFoundError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
HELP = (
    "ImageNet is read with TensorFlow Datasets as 'imagenet2012' in the array_record format. "
    "It cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org, put them in <manual_dir>, then run "
    "`tfds build imagenet2012 --manual_dir <manual_dir> --data_dir <data_dir> "
    "--file_format array_record` and pass --config.data.data_dir=<data_dir>.")


class Split:
  """A lazy random-access ImageNet split: ``len``, ``[i] -> (u8[H, W, 3] image, label)``."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    rec = self._source[int(i)]
    return np.asarray(rec["image"]), int(rec["label"])


@dataclasses.dataclass(frozen=True)
class ImageNet:
  """The two splits of TFDS ``imagenet2012`` (train, validation as test), 1,000 classes."""
  train: Split
  test: Split
  num_classes: int = 1000
  mean: np.ndarray = dataclasses.field(default_factory=lambda: np.asarray(MEAN, np.float32))
  std: np.ndarray = dataclasses.field(default_factory=lambda: np.asarray(STD, np.float32))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the network's input (the crop)."""
    return (IMAGE_SIZE, IMAGE_SIZE, 3)


def load(data_dir: str | None = None) -> ImageNet:
  """Opens TFDS ``imagenet2012`` under `data_dir` (None: the TFDS default); reads no record.

  Raises:
    DatasetNotFoundError: it is not available (the message says how to prepare it, `HELP`).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    kw = {"data_dir": data_dir} if data_dir else {}
    train = tfds.data_source("imagenet2012", split="train", **kw)
    test = tfds.data_source("imagenet2012", split="validation", **kw)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f"ImageNet (TFDS imagenet2012) is not available ({type(e).__name__}: {e}). {HELP}") from e
  return ImageNet(Split(train), Split(test))


def random_resized_crop(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
  """torchvision RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) + flip, with PIL.

  Args:
    rng: the batch's generator.
    img: u8[H, W, 3].
    size: output side.

  Returns:
    u8[size, size, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = img.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:
    ch = cw = min(h, w)
    y, x = (h - ch) // 2, (w - cw) // 2
  out = np.asarray(Image.fromarray(img[y:y + ch, x:x + cw]).resize((size, size), Image.BILINEAR))
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """Resize the short side to size / 0.875 (256 for 224), centre crop u8[size, size, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = img.shape[:2]
  s = int(round(size / 0.875)) / min(h, w)
  im = Image.fromarray(img).resize((max(size, round(w * s)), max(size, round(h * s))),
                                   Image.BILINEAR)
  a = np.asarray(im)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def _decode(split: Split, i: int, rng: np.random.Generator, train: bool, mean, std) -> tuple:
  img, label = split[i]
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, -1)
  if train:
    img = random_resized_crop(rng, img, IMAGE_SIZE).astype(np.float32) / 255.0
    for f in rng.permutation(3):  # brightness / contrast / saturation jitter 0.4 (no hue)
      a = rng.uniform(0.6, 1.4)
      ref = 0.0 if f == 0 else img.mean() if f == 1 else img.mean(-1, keepdims=True)
      img = np.clip(ref + a * (img - ref), 0.0, 1.0)
  else:
    img = center_crop(img, IMAGE_SIZE).astype(np.float32) / 255.0
  return (img - mean) / std, label


@dataclasses.dataclass(frozen=True)
class Loader:
  """One ImageNet split's batches, epoch by epoch (the interface of `pipeline.Loader`).

  Training batches are shuffled with `pipeline.epoch_permutation` and augmented (random resized
  crop, flip, colour jitter) with one generator per row seeded by ``(seed, epoch, step, row)``,
  whatever the
  process count, so a resumed run sees the same batches. Evaluation batches are in file order,
  centre-cropped, the last one padded, with a ``'mask'``.

  Attributes:
    split: the `Split`.
    batch_size: global batch size B.
    seed: data seed.
    mean: f32[3]. std: f32[3].
    train: augment and shuffle (True) or evaluate (False).
    sharding: the batch sharding; None = one device.
    max_steps: > 0 caps the steps of every epoch.
  """
  split: Split
  batch_size: int
  seed: int
  mean: np.ndarray
  std: np.ndarray
  train: bool
  sharding: jax.sharding.Sharding | None = None
  max_steps: int = -1

  @property
  def steps(self) -> int:
    n = pipeline.steps_per_epoch(len(self.split), self.batch_size, drop_remainder=self.train)
    return min(n, self.max_steps) if self.max_steps > 0 else n

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Batches ``start_step .. steps - 1`` of `epoch`: ``{'image': f32[B, 224, 224, 3],
    'label': i32[B], 'mask': f32[B]}``."""
    b, n = self.batch_size, len(self.split)
    order = pipeline.epoch_permutation(n, self.seed, epoch) if self.train else np.arange(n)
    rows = slice(0, b) if self.sharding is None else sharding_lib.local_rows(self.sharding, b)
    for step in range(start_step, self.steps):
      idx = order[step * b:(step + 1) * b]
      valid = len(idx)
      idx = np.concatenate([idx, np.zeros(b - valid, idx.dtype)])
      # One generator per row of the global batch, seeded by its position: a row's crop and
      # jitter do not depend on how many processes share the batch; each decodes only its rows.
      rngs = [np.random.default_rng([self.seed, epoch, step, r]) for r in range(b)][rows]
      decoded = [_decode(self.split, i, r, self.train, self.mean, self.std)
                 for i, r in zip(idx[rows], rngs)]
      batch = {"image": np.stack([d[0] for d in decoded]).astype(np.float32),
               "label": np.asarray([d[1] for d in decoded], np.int32),
               "mask": (np.arange(b)[rows] < valid).astype(np.float32)}
      yield (sharding_lib.shard_batch(batch, self.sharding, b) if self.sharding is not None
             else {k: jnp.asarray(v) for k, v in batch.items()})
