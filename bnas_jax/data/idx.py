"""MNIST and Fashion-MNIST: the IDX file format, a folder of the standard files, and TFDS.

The IDX format (LeCun's MNIST page): a big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian u32 dimension sizes, then the data in C order. Type ``0x08`` is unsigned byte, the only
type MNIST and Fashion-MNIST use (others are read too). Files may be gzip-compressed (``.gz``).

The standard folder layout (both datasets use the same four names)::

  train-images-idx3-ubyte[.gz]   u8[60000, 28, 28]
  train-labels-idx1-ubyte[.gz]   u8[60000]
  t10k-images-idx3-ubyte[.gz]    u8[10000, 28, 28]
  t10k-labels-idx1-ubyte[.gz]    u8[10000]

`load_folder` reads the splits that are present: a folder holding only the two ``t10k`` files
(the official test split) is enough for `load_test_split`, which the compression benchmark splits
8,000 / 2,000 (figures on that split are not comparable with published results, which train on
the 60,000-image split). `load_tfds` reads the prepared TFDS datasets ``mnist`` / ``fashion_mnist``.
"""

from __future__ import annotations

import gzip
import os
from typing import Sequence

import numpy as np

from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import pipeline
from bnas_jax.data import readers

DatasetError = dataset_lib.DatasetError

# IDX type byte -> numpy big-endian dtype.
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
OFFICIAL_COUNTS = {"train": 60_000, "test": 10_000}
IMAGE_SHAPE = (28, 28, 1)
NAMES = ("mnist", "fashion_mnist")


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally ``.gz``) into a native-endian numpy array.

  Args:
    path: the file.

  Returns:
    the array with the dimensions the header gives, e.g. ``u8[N, 28, 28]`` for an image file
    and ``u8[N]`` for a label file.

  Raises:
    DatasetError: the file does not exist, is not gzip although named ``.gz``, has a bad magic
      number or type byte, or is shorter or longer than its header says (a truncated download);
      the message names the file, the sizes and the fix.
  """
  if not os.path.isfile(path):
    raise dataset_lib.DatasetNotFoundError(f"IDX file {path} does not exist")
  try:
    with _open(path) as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip: "not a gzipped file", "Compressed file ended ..."
    raise DatasetError(f"IDX file {path} cannot be read ({type(e).__name__}: {e}); the file is "
                       "damaged or truncated: download it again") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
    raise DatasetError(f"{path} is not an IDX file (first bytes {raw[:4].hex() or 'none'}; an IDX "
                       "file starts with 00 00 <type> <ndim>, e.g. 00000803 for MNIST images)")
  dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DatasetError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes, the "
                       f"header needs {header}); download it again")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    what = "truncated" if len(raw) < expected else "longer than its header says"
    raise DatasetError(f"IDX file {path} is {what}: {len(raw):,} bytes (uncompressed) but its "
                       f"header {shape} of {dtype.name} needs {expected:,}; download it again")
  data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find(folder: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of a folder of the standard IDX files.

  Args:
    folder: holds the files of `SPLIT_FILES` (``.gz`` or not).
    split: ``'train'`` or ``'test'``.

  Returns:
    ``(u8[N, 28, 28, 1] images, i32[N] labels)``.

  Raises:
    DatasetError: a missing file (the message lists the names expected), an unreadable file, or
      image and label files of different lengths, labels outside 0..9 or images not 28 x 28.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
  paths = [_find(folder, stem) for stem in SPLIT_FILES[split]]
  if None in paths:
    raise dataset_lib.DatasetNotFoundError(
        f"{folder} lacks the MNIST/Fashion-MNIST {split} files: expected "
        f"{' and '.join(s + '[.gz]' for s in SPLIT_FILES[split])}")
  images, labels = (read_idx(p) for p in paths)
  if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
    raise DatasetError(f"{paths[0]} holds images of shape {images.shape[1:]}, expected 28 x 28")
  if labels.ndim != 1 or len(labels) != len(images):
    raise DatasetError(f"{paths[1]} holds {labels.shape} labels for the {len(images):,} images of "
                       f"{paths[0]}: the two files do not belong together")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DatasetError(f"{paths[1]} has labels outside 0..9 (min {labels.min()}, max "
                       f"{labels.max()})")
  return images[..., None].astype(np.uint8), labels.astype(np.int32)


def _dataset(name: str, train, test, source: str) -> dataset_lib.Dataset:
  mean, std = readers.channel_stats(train[0])
  return dataset_lib.Dataset(name=name, train_images=train[0], train_labels=train[1],
                                test_images=test[0], test_labels=test[1], num_classes=10,
                                mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
                                source=source)


def load_folder(folder: str, name: str = "mnist") -> dataset_lib.Dataset:
  """MNIST or Fashion-MNIST from a folder of the four standard IDX files.

  Returns:
    a `bnas_jax.dataset_lib.Dataset` (u8[N, 28, 28, 1] images, mean/std of the train split).

  Raises:
    DatasetError: as `read_split`, for either split.
  """
  train, test = read_split(folder, "train"), read_split(folder, "test")
  for split, (images, _) in (("train", train), ("test", test)):
    if len(images) != OFFICIAL_COUNTS[split]:
      raise DatasetError(f"{folder}: the {split} split has {len(images):,} images, the official "
                         f"{name} split has {OFFICIAL_COUNTS[split]:,}")
  return _dataset(name, train, test, f"idx:{folder}")


def load_test_split(folder: str, sizes: Sequence[int] = (8_000, 2_000), seed: int = 0,
                    name: str = "mnist") -> dataset_lib.Dataset:
  """A seeded split of the 10,000-image test files into (train, test), for offline runs.

  The permutation is `bnas_jax.pipeline.stable_permutation` (bit-identical everywhere).
  Figures on this split are not comparable with published results (60,000 training images).

  Args:
    folder: holds the two ``t10k`` IDX files.
    sizes: ``(n_train, n_test)``, summing to at most 10,000.
    seed: the split seed.
    name: ``'mnist'`` or ``'fashion_mnist'`` (a label).

  Returns:
    a `Dataset` with `n_train` / `n_test` images; mean/std of its train part.

  Raises:
    DatasetError: bad sizes, or as `read_split`.
  """
  images, labels = read_split(folder, "test")
  n_train, n_test = (int(s) for s in sizes)
  if n_train < 1 or n_test < 1 or n_train + n_test > len(images):
    raise DatasetError(f"sizes={tuple(sizes)} must be two positive counts summing to at most the "
                       f"{len(images):,} images of {folder}")
  perm = pipeline.stable_permutation(len(images), 0x1D8, seed)
  tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])
  return _dataset(name, (images[tr], labels[tr]), (images[te], labels[te]),
                  f"idx-t10k-split:{folder}:{n_train}/{n_test}:seed{seed}")


def load_tfds(name: str = "mnist", data_dir: str | None = None) -> dataset_lib.Dataset:
  """MNIST or Fashion-MNIST through TFDS (prepared in the array_record format).

  Raises:
    ValueError: `name` is not one of `NAMES`.
    DatasetError: the dataset is not prepared (the message says how to prepare it).
  """
  if name not in NAMES:
    raise ValueError(f"name must be one of {NAMES}, got {name!r}")
  return readers.load_tfds(name, data_dir, num_train=OFFICIAL_COUNTS["train"],
                                  num_test=OFFICIAL_COUNTS["test"])
