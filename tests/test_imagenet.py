"""Tests of bnas_jax.data.imagenet's loader on a small in-memory split (no ImageNet needed)."""

from __future__ import annotations

import numpy as np
import pytest

from bnas_jax.data import imagenet
from bnas_jax.data import pipeline
from bnas_jax.data import sharding as sharding_lib


class _Source:
  """Records like TFDS's: ``{'image': u8[H, W, C], 'label': int}`` of varied sizes."""

  def __init__(self, n: int):
    rng = np.random.default_rng(0)
    self.records = [{"image": rng.integers(0, 256, (40 + i % 3, 50 - i % 4, 1 if i == 2 else 3),
                                           dtype=np.uint8), "label": i % 7} for i in range(n)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _loader(train: bool, **kw) -> imagenet.Loader:
  return imagenet.Loader(imagenet.Split(_Source(10)), batch_size=4, seed=3,
                         mean=np.asarray(imagenet.MEAN, np.float32),
                         std=np.asarray(imagenet.STD, np.float32), train=train, **kw)


def test_batches_depend_only_on_seed_epoch_step_and_cover_the_split():
  train = _loader(True)
  assert train.steps == 2  # 10 // 4, the remainder dropped
  a, b = list(train.epoch(1)), list(train.epoch(1))
  assert [x["image"].shape for x in a] == [(4, 224, 224, 3)] * 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
  resumed = list(train.epoch(1, start_step=1))
  np.testing.assert_array_equal(np.asarray(resumed[0]["image"]), np.asarray(a[1]["image"]))
  order = pipeline.epoch_permutation(10, 3, 1)
  np.testing.assert_array_equal(np.concatenate([np.asarray(x["label"]) for x in a]),
                                order[:8] % 7)
  other = next(train.epoch(2))
  assert not np.array_equal(np.asarray(other["image"]), np.asarray(a[0]["image"]))

  test = _loader(False)
  assert test.steps == 3  # the last batch padded
  batches = list(test.epoch(0))
  mask = np.concatenate([np.asarray(x["mask"]) for x in batches])
  assert mask.tolist() == [1.0] * 10 + [0.0] * 2
  np.testing.assert_array_equal(np.concatenate([np.asarray(x["label"]) for x in batches])[:10],
                                np.arange(10) % 7)
  # Centre crop of the short side resized to 256, normalised with the ImageNet statistics.
  img = _Source(10).records[0]["image"]
  want = (imagenet.center_crop(img, 224).astype(np.float32) / 255.0 - imagenet.MEAN) / imagenet.STD
  np.testing.assert_allclose(np.asarray(batches[0]["image"][0]), want, atol=1e-5)


def test_a_process_decodes_only_its_rows_and_they_equal_the_global_batch_rows(monkeypatch):
  """With two processes each holds half of every global batch: process 1's rows (decoded alone)
  equal rows 2-3 of the batch one process decodes whole."""
  whole = list(_loader(True).epoch(0))
  decoded = []
  real_decode = imagenet._decode  # pylint: disable=protected-access

  def counting_decode(split, i, rng, train, mean, std):
    decoded.append(int(i))
    return real_decode(split, i, rng, train, mean, std)

  monkeypatch.setattr(imagenet, "_decode", counting_decode)
  monkeypatch.setattr(sharding_lib, "local_rows", lambda sharding, b: slice(2, 4))
  monkeypatch.setattr(sharding_lib, "shard_batch", lambda batch, sharding, b: batch)
  mine = list(_loader(True, sharding=object()).epoch(0))
  assert len(decoded) == 2 * len(mine)  # two rows per batch, not four
  for part, full in zip(mine, whole):
    np.testing.assert_array_equal(part["image"], np.asarray(full["image"])[2:4])
    np.testing.assert_array_equal(part["label"], np.asarray(full["label"])[2:4])


def test_missing_imagenet_names_how_to_provide_it(tmp_path):
  with pytest.raises(imagenet.DatasetNotFoundError, match="tfds build imagenet2012"):
    imagenet.load(str(tmp_path / "none"))
