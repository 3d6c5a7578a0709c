"""Readers: CIFAR layouts, TFDS, one's own images; each returns a host `dataset.Dataset`.

Data sources (``config.data.source``):

* ``'local'``: a folder in one of the official layouts, read with numpy only:
  ``cifar-10-batches-bin`` (``data_batch_{1..5}.bin``, ``test_batch.bin``; records of
  1 label byte + 3,072 pixel bytes, R, G, B planes of 32x32 row-major), ``cifar-10-batches-py``
  (pickles ``data_batch_{1..5}``, ``test_batch``), ``cifar-100-binary`` (``train.bin``,
  ``test.bin``; 1 coarse + 1 fine label byte + 3,072 pixel bytes) or ``cifar-100-python``
  (pickles ``train``, ``test``). ``data_dir`` may point at the layout folder itself or at its
  parent. CIFAR-100 uses the 100 fine labels.
* ``'tfds'``: any TFDS image-classification dataset (features ``'image'`` and ``'label'``, splits
  ``'train'`` and ``'test'``) prepared in the ``array_record`` file format, read with
  ``tfds.data_source`` (random access, no TensorFlow needed). Preparing it needs internet and,
  for TFDS, TensorFlow: ``pip install -e .[prepare]`` then
  ``python -m bnas_jax.data.prepare prepare --name cifar10 [--data_dir DIR]`` (or ``make data``).
* ``'npz'``: one's own data in one ``.npz`` file (``data_dir`` is its path) with the arrays
  ``x_train`` u8[N, H, W] or u8[N, H, W, C], ``y_train`` int[N] (or int[N, 1]), ``x_test`` and
  ``y_test`` (the names of ``keras.datasets``); labels in ``[0, num_classes)``, num_classes =
  the largest label + 1.
* ``'folder'``: one's own images, one subfolder per class: ``data_dir/train/<class>/*.png``
  (any format PIL reads) and ``data_dir/test/<class>/*``; classes are the sorted subfolder names
  of ``train``. Greyscale images (all of them) load with 1 channel, others as RGB.

Other than CIFAR, the images may have any size and channel count and any number of classes; the
search and evaluation networks adapt (stem input channels, classifier outputs; the cells' global
average pooling takes any size whose sides are divisible by 4). Their normalisation statistics are
computed from the training set (`channel_stats`); CIFAR uses the official ones.

The training process never imports TensorFlow.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from bnas_jax.data.dataset import (CIFAR_DATASETS, CIFAR_PIXELS, IMAGE_SHAPE, OFFICIAL_COUNTS, Dataset,
                                   DatasetError,
                                   DatasetNotFoundError, cifar_info, default_data_dir,
                                   find_layout, layout_files)


def _read_bin(path: str, num_classes: int, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads one binary file: records of ``label_bytes`` label bytes + 3,072 pixel bytes."""
  record = label_bytes + CIFAR_PIXELS
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'missing data file {path!r}.')
  size = os.path.getsize(path)
  if size == 0 or size % record:
    raise DatasetError(
        f'{path!r} has {size:,} bytes, not a positive multiple of the record size {record:,} '
        f'({label_bytes} label byte(s) + {CIFAR_PIXELS} pixels): the file is truncated or not a '
        f'{"CIFAR-100" if label_bytes == 2 else "CIFAR-10"} binary file.')
  raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
  labels = raw[:, label_bytes - 1].astype(np.int32)  # CIFAR-100: byte 1 is the fine label.
  images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), _check_labels(labels, num_classes, path)


def _latin1_encode(obj, encoding='utf-8', errors='strict'):
  """``_codecs.encode`` as Python 3 pickles (protocol <= 2) use it for bytes: latin-1 only."""
  if encoding not in ('latin1', 'latin-1') or errors != 'strict' or not isinstance(obj, str):
    raise pickle.UnpicklingError(f'_codecs.encode({type(obj).__name__}, {encoding!r}) is not how a '
                                 f'pickle stores bytes')
  return obj.encode('latin-1')


def _pickle_globals() -> dict[tuple[str, str], object]:
  """The globals a CIFAR python-version file may name: numpy array, scalar and dtype
  reconstruction (numpy 1 and 2 module names, pickle protocols 0-5), builtin containers, and the
  latin-1 ``_codecs.encode`` of Python 3 protocol-2 bytes. Nothing that can run other code."""
  a = np.zeros(1, np.uint8)
  reconstruct, frombuffer, scalar = (a.__reduce__()[0], a.__reduce_ex__(5)[0],
                                     np.uint8(0).__reduce__()[0])
  allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
             ('_codecs', 'encode'): _latin1_encode}
  for core in ('numpy.core', 'numpy._core'):
    allowed[(f'{core}.multiarray', '_reconstruct')] = reconstruct
    allowed[(f'{core}.multiarray', 'scalar')] = scalar
    allowed[(f'{core}.numeric', '_frombuffer')] = frombuffer
  for module in ('builtins', '__builtin__'):  # Python 3 and Python 2 names
    for t in (list, dict, tuple, set, frozenset, bytes, bytearray, str, int, float, bool, complex):
      allowed[(module, t.__name__)] = t
  return allowed


class _RefusedGlobalError(pickle.UnpicklingError):
  """A pickle names a global outside `_pickle_globals` (it would construct or call it)."""


class _CifarUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` admits only `_pickle_globals` (no code from data)."""

  _ALLOWED = None

  def find_class(self, module: str, name: str):
    if _CifarUnpickler._ALLOWED is None:
      _CifarUnpickler._ALLOWED = _pickle_globals()
    try:
      return _CifarUnpickler._ALLOWED[(module, name)]
    except KeyError:
      raise _RefusedGlobalError(f'{module}.{name}') from None


def _read_pickle(path: str, num_classes: int, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Reads one python-version file (a pickled dict with b'data' u8[N, 3072] and labels).

  The file is read with `_CifarUnpickler` (``encoding='bytes'``: Python 2 strings stay bytes):
  a pickle that names any other global (a class, ``os.system``, ...) is refused before anything
  it names is called.

  Raises:
    DatasetNotFoundError: the file does not exist.
    DatasetError: a refused global (naming the file and the global), or not a CIFAR pickle.
  """
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'missing data file {path!r}.')
  try:
    with open(path, 'rb') as f:
      entry = _CifarUnpickler(f, encoding='bytes').load()
    data = np.asarray(entry[b'data'], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int32)
  except _RefusedGlobalError as e:
    raise DatasetError(
        f'{path!r} refers to {e}, which no CIFAR python-version file holds; refused unread (a data '
        f'file may not run code). Replace it with the official file.') from None
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
          IndexError) as e:
    raise DatasetError(
        f'{path!r} is not a readable CIFAR python-version pickle with keys b"data" and '
        f'{label_key!r} (truncated or wrong file?): {type(e).__name__}: {e}') from e
  if data.ndim != 2 or data.shape[1] != CIFAR_PIXELS or labels.shape != (data.shape[0],):
    raise DatasetError(
        f'{path!r}: expected b"data" u8[N, {CIFAR_PIXELS}] and N labels, found data shape '
        f'{data.shape} and {labels.shape} labels.')
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), _check_labels(labels, num_classes, path)


def _check_labels(labels: np.ndarray, num_classes: int, path: str) -> np.ndarray:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DatasetError(
        f'{path!r}: labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}] '
        f'(a file of another dataset?).')
  return labels


def _check_count(what: str, found: int, expected: int, detail: str) -> None:
  if expected < 0:  # -1: any number (one's own data)
    return
  if found < expected:
    raise DatasetError(
        f'{what}: expected {expected:,} records, found {found:,} ({detail}). A truncated or '
        f'missing file? For a deliberate subset set config.data.num_train / num_test (-1: any '
        f'number).')
  if found > expected:
    raise DatasetError(
        f'{what}: expected {expected:,} records (config.data.num_train / num_test), found '
        f'{found:,} ({detail}). Point config.data.data_dir at the folder the config was written '
        f'for (e.g. a subset such as cifar10-lossless-subset), or set num_train / num_test to '
        f'the records in this folder.')


def load_local(name: str, data_dir: str | None = None, *, num_train: int = 50_000,
               num_test: int = 10_000) -> Dataset:
  """Loads CIFAR-10/100 from a local folder in an official layout (see module docstring).

  Args:
    name: ``'cifar10'`` or ``'cifar100'``.
    data_dir: the layout folder or its parent; None = `default_data_dir`.
    num_train: expected number of training records (all ``data_batch_*`` files together).
    num_test: expected number of test records.

  Returns:
    The `Dataset` (images u8[N, 32, 32, 3] in file order).

  Raises:
    DatasetNotFoundError: missing folder or file.
    DatasetError: truncated/wrong-size file, unreadable pickle, labels out of range, or record
      counts other than ``num_train`` / ``num_test``.
  """
  num_classes, mean, std, _, _ = cifar_info(name)
  kind, folder = find_layout(name, data_dir if data_dir is not None else default_data_dir())
  train_pattern, test_name = layout_files(name, kind)
  if kind == 'bin':
    label_bytes = 1 if name == 'cifar10' else 2
    read = functools.partial(_read_bin, num_classes=num_classes, label_bytes=label_bytes)
  else:
    label_key = b'labels' if name == 'cifar10' else b'fine_labels'
    read = functools.partial(_read_pickle, num_classes=num_classes, label_key=label_key)

  if name == 'cifar10':  # data_batch_1, data_batch_2, ... (consecutive, at least one).
    train_files = []
    while os.path.exists(os.path.join(folder, train_pattern.format(len(train_files) + 1))):
      train_files.append(os.path.join(folder, train_pattern.format(len(train_files) + 1)))
    if not train_files:
      raise DatasetNotFoundError(
          f'{name}: no training file {train_pattern.format(1)!r} in {folder!r}; expected '
          f'{train_pattern.format("1..5")}.')
  else:
    train_files = [os.path.join(folder, train_pattern)]
  parts = [read(f) for f in train_files]
  counts = ', '.join(f'{os.path.basename(f)}: {len(p[1]):,}' for f, p in zip(train_files, parts))
  train_images = np.concatenate([p[0] for p in parts])
  train_labels = np.concatenate([p[1] for p in parts])
  _check_count(f'{name} training set in {folder!r}', len(train_labels), num_train, counts)
  test_images, test_labels = read(os.path.join(folder, test_name))
  _check_count(f'{name} test set {os.path.join(folder, test_name)!r}', len(test_labels), num_test,
               f'{test_name}: {len(test_labels):,}')
  return Dataset(name=name, train_images=train_images, train_labels=train_labels,
                 test_images=test_images, test_labels=test_labels, num_classes=num_classes,
                 mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
                 source=folder)


# ---------------------------------------------------------------------------
# TFDS (array_record) source.
# ---------------------------------------------------------------------------


def load_tfds(name: str, data_dir: str | None = None, *, num_train: int = 50_000,
              num_test: int = 10_000, image_size: int = 0) -> Dataset:
  """Loads a TFDS image-classification dataset prepared in the array_record format, without
  TensorFlow.

  Args:
    name: the TFDS name (``'cifar10'``, ``'cifar100'``, ``'mnist'``, ...); the dataset needs the
      features ``'image'`` and ``'label'`` and the splits ``'train'`` and ``'test'``.
    data_dir: the TFDS data dir; None = TFDS's default (``~/tensorflow_datasets``).
    num_train: expected number of training records (-1: any).
    num_test: expected number of test records (-1: any).
    image_size: > 0 resizes every image to ``image_size x image_size``; 0 keeps them.

  Returns:
    The `Dataset` in TFDS record order; CIFAR with the official mean/std, other datasets with
    the statistics of their training split (`channel_stats`).

  Raises:
    DatasetError: the dataset is not prepared in ``data_dir`` in the array_record format (the
      message says how to prepare it), has no ``'image'`` / ``'label'`` features, images of
      several sizes without ``image_size``, or record counts other than ``num_train`` /
      ``num_test``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  arrays, num_classes = {}, None
  for split, expected in (('train', num_train), ('test', num_test)):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      records = [source[i] for i in range(len(source))]
    except Exception as e:  # TFDS raises several types for "not prepared / wrong format".
      raise DatasetError(
          f'TFDS dataset {name!r} (split {split!r}, data_dir={data_dir!r}) could not be read as '
          f'an array_record data source: {type(e).__name__}: {str(e)[:300]}. Prepare it with '
          f'`pip install -e .[prepare]` and `python -m bnas_jax.data.prepare prepare --name '
          f'{name}` (or `make data`), or use config.data.source="local".') from e
    if num_classes is None:
      try:
        num_classes = int(source.dataset_info.features['label'].num_classes)
      except (AttributeError, KeyError, TypeError):
        num_classes = None
    _check_count(f'TFDS {name} {split} split', len(records), expected, f'data_dir={data_dir!r}')
    if records and not {'image', 'label'} <= set(records[0]):
      raise DatasetError(f'TFDS {name} {split}: records have the features {sorted(records[0])}; '
                         'an image-classification dataset with "image" and "label" is needed.')
    images = _stack_images([np.asarray(r['image'], np.uint8) for r in records], image_size,
                           f'TFDS {name} {split}')
    labels = np.asarray([r['label'] for r in records], np.int32)
    if name in CIFAR_DATASETS and images.shape[1:] != IMAGE_SHAPE:
      raise DatasetError(f'TFDS {name} {split}: expected images {IMAGE_SHAPE}, got {images.shape[1:]}.')
    arrays[split] = (images, labels)
  if num_classes is None:
    num_classes = int(max(arrays[k][1].max(initial=-1) for k in ('train', 'test'))) + 1
  for split, (_, labels) in arrays.items():
    _check_labels(labels, num_classes, f'tfds:{name}/{split}')
  if name in CIFAR_DATASETS:
    _, mean, std, _, _ = CIFAR_DATASETS[name]
  else:
    mean, std = channel_stats(arrays['train'][0])
  return Dataset(name=name, train_images=arrays['train'][0], train_labels=arrays['train'][1],
                 test_images=arrays['test'][0], test_labels=arrays['test'][1],
                 num_classes=num_classes, mean=np.asarray(mean, np.float32),
                 std=np.asarray(std, np.float32), source=f'tfds:{name}')


# ---------------------------------------------------------------------------
# One's own data: a .npz file or a folder of images per class.
# ---------------------------------------------------------------------------


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of u8[N, H, W, C] images, in [0, 1] units.

  Returns:
    ``(mean f32[C], std f32[C])``; a constant channel gets std 1 (so normalising keeps it finite).
  """
  c = images.shape[-1]
  total, total_sq, n = np.zeros(c), np.zeros(c), 0
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk].reshape(-1, c).astype(np.float64) / 255.0
    total += x.sum(0)
    total_sq += np.square(x).sum(0)
    n += x.shape[0]
  mean = total / max(n, 1)
  std = np.sqrt(np.maximum(total_sq / max(n, 1) - np.square(mean), 0.0))
  std = np.where(std > 0, std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def _as_nhwc(images: np.ndarray, what: str) -> np.ndarray:
  """u8[N, H, W] or u8[N, H, W, C] -> u8[N, H, W, C]."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] < 1:
    raise DatasetError(f'{what}: expected images u8[N, H, W] or u8[N, H, W, C], got shape '
                       f'{images.shape}.')
  if images.dtype != np.uint8:
    raise DatasetError(f'{what}: expected uint8 pixels in [0, 255], got {images.dtype}; convert '
                       'with (x * 255).round().astype(np.uint8) for floats in [0, 1].')
  return np.ascontiguousarray(images)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """u8[H, W, C] -> u8[size, size, C] (bilinear, PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  channels = [np.asarray(Image.fromarray(image[..., k]).resize((size, size), Image.BILINEAR))
              for k in range(image.shape[-1])]
  return np.stack(channels, -1)


def _stack_images(images: Sequence[np.ndarray], image_size: int, what: str) -> np.ndarray:
  """Stacks u8[H, W(, C)] images (resized to ``image_size`` if > 0) into u8[N, H, W, C]."""
  images = [im[..., None] if im.ndim == 2 else im for im in images]
  if image_size > 0:
    images = [im if im.shape[:2] == (image_size, image_size) else _resize(im, image_size)
              for im in images]
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    raise DatasetError(f'{what}: images of {len(shapes)} shapes ({shapes[:3]}...); set '
                       'config.data.image_size to resize them to one size.')
  if not images:
    raise DatasetError(f'{what}: no images.')
  return _as_nhwc(np.stack(images), what)


def _check_labels_1d(labels: np.ndarray, n: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise DatasetError(f'{what}: expected {n} integer labels int[N], got {labels.dtype}'
                       f'{list(labels.shape)}.')
  if labels.size and labels.min() < 0:
    raise DatasetError(f'{what}: labels must be >= 0, found {labels.min()}.')
  return labels.astype(np.int32)


def _own_dataset(name: str, train: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], source: str) -> Dataset:
  if train[0].shape[1:] != test[0].shape[1:]:
    raise DatasetError(f'{source}: training images {train[0].shape[1:]} and test images '
                       f'{test[0].shape[1:]} differ in shape; set config.data.image_size.')
  num_classes = int(max(train[1].max(initial=-1), test[1].max(initial=-1))) + 1
  mean, std = channel_stats(train[0])
  return Dataset(name=name, train_images=train[0], train_labels=train[1], test_images=test[0],
                 test_labels=test[1], num_classes=num_classes, mean=mean, std=std, source=source)


def load_npz(path: str, *, name: str = 'npz', num_train: int = -1, num_test: int = -1,
             image_size: int = 0) -> Dataset:
  """Loads one's own data from a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (module docstring).

  Args:
    path: the ``.npz`` file.
    name: a label for the logs.
    num_train, num_test: expected numbers of examples (-1: any).
    image_size: > 0 resizes every image to ``image_size x image_size``; 0 keeps them.

  Returns:
    The `Dataset` (images u8[N, H, W, C]; mean/std from the training images).

  Raises:
    DatasetNotFoundError: no such file. DatasetError: a missing array, images that are not
    uint8 [N, H, W(, C)], labels that are not N integers >= 0, or other counts than expected.
  """
  path = os.path.expanduser(path or '')
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'config.data.data_dir={path!r} is not a file: for '
                               'config.data.source="npz" point it at the .npz file.')
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path!r} is not a readable .npz file: {e}') from e
  missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in arrays]
  if missing:
    raise DatasetError(f'{path!r} lacks the arrays {missing} (it has {sorted(arrays)}); save it '
                       'with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).')
  parts = {}
  for split, expected in (('train', num_train), ('test', num_test)):
    what = f'{path}: x_{split}'
    images = _as_nhwc(np.asarray(arrays[f'x_{split}']), what)
    if image_size > 0 and images.shape[1:3] != (image_size, image_size):
      images = _stack_images(list(images), image_size, what)
    labels = _check_labels_1d(arrays[f'y_{split}'], len(images), f'{path}: y_{split}')
    _check_count(f'{path} {split} set', len(labels), expected, f'x_{split}: {len(labels):,}')
    parts[split] = (images, labels)
  return _own_dataset(name, parts['train'], parts['test'], path)


_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                     '.pgm')


def load_folder(data_dir: str, *, name: str = 'folder', num_train: int = -1, num_test: int = -1,
                image_size: int = 0) -> Dataset:
  """Loads one's own images from ``data_dir/{train,test}/<class>/<image>`` (module docstring).

  Args:
    data_dir: the folder holding ``train/`` and ``test/``.
    name: a label for the logs.
    num_train, num_test: expected numbers of images (-1: any).
    image_size: > 0 resizes every image to ``image_size x image_size``; 0 needs one size.

  Returns:
    The `Dataset`: labels are the indices of the sorted class folder names of ``train/``; images
    u8[N, H, W, 1] when every image is greyscale, else u8[N, H, W, 3].

  Raises:
    DatasetNotFoundError: a missing folder. DatasetError: no class folders or images, a test
    class that ``train/`` lacks, unreadable images, several sizes without ``image_size``, or
    other counts than expected.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir or '')
  for split in ('train', 'test'):
    if not os.path.isdir(os.path.join(data_dir, split)):
      raise DatasetNotFoundError(
          f'{os.path.join(data_dir, split)!r} does not exist: for config.data.source="folder" '
          'point config.data.data_dir at a folder with train/<class>/ and test/<class>/ images.')
  classes = sorted(d for d in os.listdir(os.path.join(data_dir, 'train'))
                   if os.path.isdir(os.path.join(data_dir, 'train', d)))
  if not classes:
    raise DatasetError(f'{os.path.join(data_dir, "train")!r} has no class subfolders.')
  files = {}
  for split in ('train', 'test'):
    extra = sorted(set(d for d in os.listdir(os.path.join(data_dir, split))
                       if os.path.isdir(os.path.join(data_dir, split, d))) - set(classes))
    if extra:
      raise DatasetError(f'{os.path.join(data_dir, split)!r} has classes {extra} that train/ '
                         'lacks.')
    files[split] = [(os.path.join(data_dir, split, c, f), k) for k, c in enumerate(classes)
                    if os.path.isdir(os.path.join(data_dir, split, c))
                    for f in sorted(os.listdir(os.path.join(data_dir, split, c)))
                    if f.lower().endswith(_IMAGE_EXTENSIONS)]
  decoded = {}
  for split, items in files.items():
    out = []
    for path, _ in items:
      try:
        with Image.open(path) as im:
          im.load()
          out.append(im.copy())
      except OSError as e:
        raise DatasetError(f'{path!r} is not an image PIL can read: {e}') from e
    decoded[split] = out
  grey = all(im.mode in ('1', 'L', 'I', 'I;16', 'F') for ims in decoded.values() for im in ims)
  parts = {}
  for split, expected in (('train', num_train), ('test', num_test)):
    images = [np.asarray(im.convert('L' if grey else 'RGB'), np.uint8) for im in decoded[split]]
    what = os.path.join(data_dir, split)
    stacked = _stack_images(images, image_size, what)
    labels = np.asarray([k for _, k in files[split]], np.int32)
    _check_count(f'{what}', len(labels), expected, f'{len(labels):,} images')
    parts[split] = (stacked, labels)
  return _own_dataset(name, parts['train'], parts['test'], data_dir)


def load_dataset(data_cfg: ml_collections.ConfigDict | Mapping) -> Dataset:
  """Loads the dataset described by ``config.data`` (fields in the module docstring).

  Raises:
    DatasetError / DatasetNotFoundError: as `load_local` / `load_tfds` / `load_npz` /
      `load_folder`, or an unknown source.
  """
  get = data_cfg.get
  name = get('name', 'cifar10')
  kwargs = dict(num_train=int(get('num_train', OFFICIAL_COUNTS['train'])),
                num_test=int(get('num_test', OFFICIAL_COUNTS['test'])))
  source = get('source', 'local')
  image_size = int(get('image_size', 0) or 0)
  if source == 'local':
    if image_size:
      raise DatasetError('config.data.image_size applies to the tfds, npz and folder sources; '
                         'set it to 0 for the CIFAR layouts of source "local".')
    return load_local(name, get('data_dir', None), **kwargs)
  if source == 'tfds':
    return load_tfds(name, get('data_dir', None), image_size=image_size, **kwargs)
  if source in ('npz', 'folder'):
    load = load_npz if source == 'npz' else load_folder
    return load(get('data_dir', None), name=name, image_size=image_size, **kwargs)
  raise DatasetError(f"config.data.source={source!r} is not supported; use 'local', 'tfds', "
                     "'npz' or 'folder'.")
