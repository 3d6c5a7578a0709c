"""One's own data (``config.data.source`` 'npz' / 'folder') and what a search shows in TensorBoard.

The data is generated: 48 x 48 greyscale images of 5 classes (a bright square whose position is
the class, plus noise), so every shape the CIFAR pipeline fixed (32 x 32 x 3, 10 classes) differs.
Oracles: the .npz and the folder of PNGs load to the same arrays; the statistics are those of
the training images; a tiny search and a tiny retraining run end to end on it; the search's
event file holds the histograms, the cell picture and the HParams session, read back with a
TFRecord reader and tensorboardX's protos.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from bnas_jax import bayes
from bnas_jax import config_files
from bnas_jax import metrics as metrics_lib
from bnas_jax import search
from bnas_jax import train_eval
from bnas_jax.data import dataset
from bnas_jax.data import pipeline
from bnas_jax.data import readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, CLASSES, N_TRAIN, N_TEST = 48, 5, 40, 10


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """u8[n, 48, 48] images and i32[n] labels: class k has a bright 12 x 12 square at offset 8k."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n, dtype=np.int32) % CLASSES
  images = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
  for i, k in enumerate(labels):
    images[i, 8 * k:8 * k + 12, 8 * k:8 * k + 12] = 220
  return images, labels


@pytest.fixture(scope="module")
def own_npz(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("own") / "own.npz")
  x_train, y_train = make_images(N_TRAIN, 0)
  x_test, y_test = make_images(N_TEST, 1)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def read_events(logdir: str) -> dict[str, set[str]]:
  """``{tag: kinds}`` of every summary in the event files under ``logdir`` (kinds: 'scalar',
  'histo', 'image', or the plugin name such as 'hparams')."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, set[str]] = {}
  for root, _, files in os.walk(logdir):
    for name in files:
      if "tfevents" not in name:
        continue
      with open(os.path.join(root, name), "rb") as f:
        while len(header := f.read(12)) == 12:  # TFRecord: u64 length, crc, data, crc
          (length,) = struct.unpack("<Q", header[:8])
          event = event_pb2.Event.FromString(f.read(length))
          f.read(4)
          for v in event.summary.value:
            kind = v.WhichOneof("value") or v.metadata.plugin_data.plugin_name
            out.setdefault(v.tag, set()).add({"simple_value": "scalar"}.get(kind, kind))
  return out


def test_npz_and_folder_load_the_same_data_with_its_own_statistics(own_npz, tmp_path):
  ds = readers.load_dataset({"name": "own", "source": "npz", "data_dir": own_npz,
                                    "num_train": -1, "num_test": -1})
  assert ds.image_shape == (SIZE, SIZE, 1) and ds.num_classes == CLASSES
  assert ds.train_images.dtype == np.uint8 and len(ds.test_labels) == N_TEST
  x = ds.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-5)
  np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-5)

  for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                ("test", ds.test_images, ds.test_labels)):
    for i, (im, k) in enumerate(zip(images, labels)):
      folder = tmp_path / split / f"class_{k}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
  fds = readers.load_dataset({"name": "own", "source": "folder", "data_dir": str(tmp_path),
                                     "num_train": N_TRAIN, "num_test": N_TEST})
  assert fds.num_classes == CLASSES
  order = np.lexsort((np.arange(N_TRAIN), ds.train_labels))  # the folder lists class by class
  np.testing.assert_array_equal(fds.train_images, ds.train_images[order])
  np.testing.assert_array_equal(fds.train_labels, ds.train_labels[order])
  np.testing.assert_allclose(fds.mean, ds.mean, rtol=1e-6)

  resized = readers.load_dataset({"source": "folder", "data_dir": str(tmp_path),
                                         "num_train": -1, "num_test": -1, "image_size": 24})
  assert resized.image_shape == (24, 24, 1)
  batch = next(pipeline.Loader(
      ds.train_images, ds.train_labels, batch_size=4, seed=0, mean=ds.mean, std=ds.std,
      augment=True, cutout=8).epoch(0))
  assert batch["image"].shape == (4, SIZE, SIZE, 1)


def test_bad_own_data_is_named(own_npz, tmp_path):
  bad = str(tmp_path / "bad.npz")
  x, y = make_images(8, 0)
  np.savez(bad, x_train=x.astype(np.float32) / 255, y_train=y, x_test=x, y_test=y)
  with pytest.raises(dataset.DatasetError, match="x_train.*uint8"):
    readers.load_npz(bad)
  np.savez(bad, x_train=x, y_train=y)
  with pytest.raises(dataset.DatasetError, match=r"lacks the arrays \['x_test', 'y_test'\]"):
    readers.load_npz(bad)
  with pytest.raises(dataset.DatasetNotFoundError, match="data_dir"):
    readers.load_dataset({"source": "npz", "data_dir": str(tmp_path / "none.npz")})
  with pytest.raises(dataset.DatasetError, match="expected 50,000 records"):
    readers.load_dataset({"source": "npz", "data_dir": own_npz})  # the CIFAR counts
  with pytest.raises(dataset.DatasetError, match="image_size=32"):
    dataset.check_image_shape((30, 30, 1))
  with pytest.raises(dataset.DatasetError, match="source"):
    readers.load_dataset({"name": "own", "source": "local", "data_dir": str(tmp_path)})


def test_prior_histograms_picture_and_hparams_are_in_the_event_file(tmp_path):
  switches = {"normal": np.ones((2, 3, 4), np.float32), "reduce": np.ones((1, 3, 4), np.float32)}
  prior = bayes.init(switches)
  prior = prior._replace(alive={"normal": np.array([[True] * 4, [True] * 4, [False] * 4]),
                                "reduce": np.ones((3, 4), bool)})
  picture = str(tmp_path / "cells.png")
  Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(picture)
  config = search.default_config()
  writer = metrics_lib.MetricWriter(str(tmp_path / "tb"))
  metrics_lib.write_prior_histograms(writer, 7, prior, switches)
  metrics_lib.write_picture(writer, 7, picture)
  metrics_lib.write_hparams(writer, 7, config, {"val_accuracy": 0.5, "nb201_accuracy": 91.2})
  writer.close()
  tags = read_events(str(tmp_path / "tb"))
  for field in ("gamma", "omega", "H", "switches"):
    for tau in ("normal", "reduce"):
      for kind in ("origin", "op"):
        assert tags[f"{field}/{tau}/{kind}"] == {"histo"}, (field, tau, kind)
  assert tags["cells"] == {"image"}
  assert "hparams" in set().union(*tags.values())
  assert tags["final/val_accuracy"] == tags["final/nb201_accuracy"] == {"scalar"}
  assert metrics_lib.hparams_of(config)["data.seed"] == 0


def test_search_and_retraining_on_own_data_end_to_end(own_npz, tmp_path):
  config = config_files.load(os.path.join(REPO, "experiments", "tiny.py")).get_config()
  config.data.name = "own"
  config.data.source = "npz"
  config.data.data_dir = own_npz
  config.data.num_train = config.data.num_test = -1
  config.lock()
  result = search.run(config, str(tmp_path / "search"))
  assert result.completed and result.genotype is not None
  with open(tmp_path / "search" / "summary.json") as f:
    assert json.load(f)["genotype"]["space"] == "nb201"
  tags = read_events(str(tmp_path / "search" / "tensorboard"))
  for tag in ("gamma/normal/op", "H/normal/origin", "switches/normal/op"):
    assert tags[tag] == {"histo"}, tag
  assert tags["cells"] == {"image"}
  assert tags["final/val_accuracy"] == {"scalar"}

  # Retraining a DARTS cell on the same data: 1-channel stem, 5 outputs, 48 x 48 input.
  geno = str(tmp_path / "darts.json")
  from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  genotype_lib.load_genotype("darts_v2").save(geno)
  c = train_eval.default_config()
  c.genotype = geno
  c.model.init_channels, c.model.num_cells = 4, 2
  c.data.name, c.data.source, c.data.data_dir = "own", "npz", own_npz
  c.data.num_train = c.data.num_test = -1
  c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 1, 8, 10
  c.train.max_steps_per_epoch = 2
  c.checkpoint.async_save, c.progress_bar = False, False
  out = train_eval.run(c, str(tmp_path / "train"))
  assert out["epochs_done"] == 1 and out["test_examples"] == N_TEST
  assert 0.0 <= out["test_error"] <= 100.0


def test_any_tfds_image_dataset_by_name(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  class FakeSource(list):  # what tfds.data_source returns: random access + dataset_info
    dataset_info = type("Info", (), {"features": {"label": type("L", (), {"num_classes": 7})()}})

  def data_source(name, split, data_dir, download):
    assert (name, data_dir, download) == ("my_digits", None, False)
    x, y = make_images(6 if split == "train" else 3, 0)
    return FakeSource({"image": im[..., None], "label": k} for im, k in zip(x, y))

  monkeypatch.setattr(tfds, "data_source", data_source)
  ds = readers.load_dataset({"name": "my_digits", "source": "tfds", "num_train": 6,
                                    "num_test": 3, "image_size": 24})
  assert ds.image_shape == (24, 24, 1) and ds.num_classes == 7 and ds.source == "tfds:my_digits"
  np.testing.assert_allclose(ds.mean, readers.channel_stats(ds.train_images)[0])
