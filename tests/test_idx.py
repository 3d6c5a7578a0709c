"""The IDX reader on the real MNIST test files of shared/ (data/mnist-t10k) and on damaged copies.

Oracles: the file sizes and per-class counts published with the files (their README), the IDX
header layout written by hand in the synthetic tests, and the gzip stream itself.
"""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import idx

# Per-class counts of the official t10k labels (shared/data/mnist-t10k/README.md).
T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir(shared_dir):
  return os.path.join(shared_dir, "data", "mnist-t10k")


def test_reads_the_real_t10k_files(mnist_dir):
  images, labels = idx.read_split(mnist_dir, "test")
  assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10_000,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), T10K_CLASS_COUNTS)
  # The raw bytes after the 16-byte header are the pixels, in order.
  with gzip.open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), "rb") as f:
    raw = f.read()
  assert raw[:4] == b"\x00\x00\x08\x03"
  np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(raw[16:], np.uint8))
  assert 0 < images.mean() < 255 and images.max() == 255


def test_seeded_split_is_disjoint_and_reproducible(mnist_dir):
  a = idx.load_test_split(mnist_dir, (8_000, 2_000), seed=3)
  b = idx.load_test_split(mnist_dir, (8_000, 2_000), seed=3)
  c = idx.load_test_split(mnist_dir, (8_000, 2_000), seed=4)
  assert a.train_images.shape == (8_000, 28, 28, 1) and a.test_images.shape == (2_000, 28, 28, 1)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  assert not np.array_equal(a.train_labels, c.train_labels)
  images, labels = idx.read_split(mnist_dir, "test")
  # Together the two parts are the 10,000 images exactly once.
  both = np.concatenate([a.train_images, a.test_images]).reshape(10_000, -1)
  key = lambda x: np.lexsort(x.T[::-1])
  np.testing.assert_array_equal(both[key(both)], images.reshape(10_000, -1)[key(
      images.reshape(10_000, -1))])
  assert sorted(np.concatenate([a.train_labels, a.test_labels]).tolist()) == sorted(labels.tolist())
  with pytest.raises(dataset_lib.DatasetError, match="sizes"):
    idx.load_test_split(mnist_dir, (9_000, 2_000))


def test_truncated_file_is_named(mnist_dir, tmp_path):
  with gzip.open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), "rb") as f:
    raw = f.read()
  bad = tmp_path / "t10k-images-idx3-ubyte"
  bad.write_bytes(raw[:len(raw) - 784 * 3])  # three images short, not compressed
  with pytest.raises(dataset_lib.DatasetError, match=r"truncated.*7,837,664 bytes.*7,840,016"):
    idx.read_idx(str(bad))
  gz = tmp_path / "cut" / "t10k-images-idx3-ubyte.gz"
  gz.parent.mkdir()
  data = open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), "rb").read()
  gz.write_bytes(data[:len(data) // 2])  # a download cut in half
  shutil.copy(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"), gz.parent)
  with pytest.raises(dataset_lib.DatasetError, match=r"cut.*damaged or truncated"):
    idx.read_split(str(gz.parent), "test")


def test_bad_magic_header_and_missing_files(tmp_path):
  (tmp_path / "x").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
  with pytest.raises(dataset_lib.DatasetError, match="not an IDX file"):
    idx.read_idx(str(tmp_path / "x"))
  (tmp_path / "y").write_bytes(b"\x00\x00\x08\x03\x00\x00")
  with pytest.raises(dataset_lib.DatasetError, match="inside its header"):
    idx.read_idx(str(tmp_path / "y"))
  with pytest.raises(dataset_lib.DatasetNotFoundError, match="train-images-idx3-ubyte"):
    idx.load_folder(str(tmp_path))


def test_other_types_and_shapes_round_trip(tmp_path):
  x = np.arange(24, dtype=">i4").reshape(2, 3, 4)
  header = b"\x00\x00\x0c\x03" + np.asarray(x.shape, ">u4").tobytes()
  (tmp_path / "z").write_bytes(header + x.tobytes())
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "z")), np.arange(24).reshape(2, 3, 4))


def test_tfds_name_is_checked():
  with pytest.raises(ValueError, match="fashion_mnist"):
    idx.load_tfds("kmnist")
