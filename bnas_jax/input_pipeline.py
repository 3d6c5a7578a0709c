"""Input pipeline: CIFAR-10/100, TFDS image datasets or one's own images; seeded splits,
on-device augmentation, sharding.

Batches are dicts ``{'image': f32[B, H, W, C] (normalised), 'label': i32[B]}`` (plus
``'mask': f32[B]`` when an epoch is iterated with ``drop_remainder=False``, see `epoch_batches`);
32 x 32 x 3 for CIFAR, any size and channel count for other data.

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
  ``python -m bnas_jax.input_pipeline prepare --name cifar10 [--data_dir DIR]`` (or ``make data``).
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

``config.data`` fields (defaults in `get_config`):

* ``name``: ``'local'``: ``'cifar10'`` | ``'cifar100'``; ``'tfds'``: the TFDS name (e.g.
  ``'mnist'``, ``'svhn_cropped'``); ``'npz'`` / ``'folder'``: a label for the logs.
* ``source``: ``'local'`` | ``'tfds'`` | ``'npz'`` | ``'folder'``.
* ``data_dir``: str or None. ``'local'``: the layout folder or its parent; None means
  ``$BNAS_DATA_DIR``, else ``~/.cache/bnas_jax`` (where ``make data-shared`` and the tests build
  ``cifar-10-batches-bin``). ``'tfds'``: the TFDS data dir (None = TFDS default). ``'npz'``: the
  ``.npz`` file. ``'folder'``: the folder holding ``train/`` and ``test/``.
* ``num_train``, ``num_test``: expected numbers of records (50,000 / 10,000 for the official
  sets; smaller for a subset such as the 4,000/1,000 lossless CIFAR-10 subset); -1 accepts any
  number (one's own data). A mismatch is an error.
* ``image_size``: 0 keeps the images as they are (they must all have one size); > 0 resizes every
  image to ``image_size x image_size`` (bilinear, PIL) when it is loaded. Not for ``'local'``.
* ``seed``: seeds the splits, the per-epoch shuffles and the augmentation. In the search and
  retraining configs it follows the top-level ``seed`` unless set itself (`follow`).
* ``splits``: ``{name: size}`` of disjoint subsets of the training set drawn by `split_train`
  (default warmup 5,000 / search 40,000 / val 5,000). The test set is never part of a split.
* ``cutout``: cutout side in pixels for the augmented loaders (0 = off; DARTS uses 16).

Randomness (all reproducible from ``seed``):

* Splits: a permutation of ``range(num_train)`` from ``seed`` (`stable_permutation`, a SplitMix64
  hash: identical on every platform and numpy version); consecutive chunks go to the splits in
  the order given.
* Shuffling: a permutation of the split from ``(seed, epoch)``.
* Augmentation: ``jax.random`` keyed by ``fold_in(fold_in(key(seed), epoch), step)``
  (`batch_key`) inside one jitted function, so a run resumed at ``(epoch, start_step)`` sees
  exactly the batches of an uninterrupted run.

Augmentation (spec section 5; DARTS): random H x W crop of the image zero-padded by 4 pixels (in
pixel space), horizontal flip with probability 1/2, per-channel normalisation with the dataset's
mean/std, then cutout: a ``cutout x cutout`` square centred uniformly in the image, clipped at the
borders, set to 0 *after* normalisation.

Data parallelism: `make_mesh` builds a 1-D mesh over all devices (axis ``'data'``); with
``sharding=batch_sharding(mesh)`` each global batch is split along its batch axis
(``NamedSharding(mesh, P('data'))``). With several processes each process loads only its own rows
of the global batch and the global array is assembled with
``jax.make_array_from_process_local_data``.

Errors: every problem with the data (missing folder, wrong or truncated file, wrong record count,
split sizes that do not fit, batch size not divisible by the device count) raises `DatasetError`
(a ``ValueError``); a missing path raises its subclass `DatasetNotFoundError` (also a
``FileNotFoundError``). The message names the path or input and what was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Official per-channel statistics of the training sets, in [0, 1] units.
# CIFAR-10: spec section 5. CIFAR-100: the values used by DARTS (utils.py) and most NAS code.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3

# name -> (num_classes, mean, std, binary layout folder, pickle layout folder)
_DATASETS = {
    'cifar10': (10, CIFAR10_MEAN, CIFAR10_STD, 'cifar-10-batches-bin', 'cifar-10-batches-py'),
    'cifar100': (100, CIFAR100_MEAN, CIFAR100_STD, 'cifar-100-binary', 'cifar-100-python'),
}
_OFFICIAL_COUNTS = {'train': 50_000, 'test': 10_000}
DATA_AXIS = 'data'
DEFAULT_CACHE = os.path.join('~', '.cache', 'bnas_jax')
_SHARED_BUILD_SCRIPT = os.path.join('data', 'cifar10-jpeg-q75-derived', 'make_cifar10_bin.py')


class DatasetError(ValueError):
  """Bad or missing data, or data options that do not fit the data."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A data path that does not exist."""


def get_config() -> ml_collections.ConfigDict:
  """Default ``config.data`` (fields documented in the module docstring)."""
  config = ml_collections.ConfigDict()
  config.name = 'cifar10'
  config.source = 'local'
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.image_size = 0
  config.num_train = _OFFICIAL_COUNTS['train']
  config.num_test = _OFFICIAL_COUNTS['test']
  config.seed = 0
  config.splits = ml_collections.ConfigDict({'warmup': 5_000, 'search': 40_000, 'val': 5_000})
  config.cutout = 0
  return config


def follow(config: ml_collections.ConfigDict, field: str) -> ml_collections.FieldReference:
  """A config value that follows ``config[field]`` until it is set itself.

  ``c.data.seed = follow(c, 'seed')`` makes ``--config.seed=3`` set both seeds, while
  ``--config.data.seed=5`` sets the data seed alone (it replaces this reference's own value; a
  plain ``c.get_ref('seed')`` would be shared, and setting it would change ``c.seed`` too).
  Config files (``config.json``) store the resolved value.
  """
  ref = config.get_ref(field)
  return ml_collections.FieldReference(ref, field_type=ref.get_type())


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset, all on the host.

  Attributes:
    name: ``config.data.name`` (``'cifar10'``, ``'cifar100'``, a TFDS name or a label).
    train_images: u8[N_train, H, W, C] (32 x 32 x 3 for CIFAR), in file order.
    train_labels: i32[N_train] in ``[0, num_classes)``.
    test_images: u8[N_test, H, W, C].
    test_labels: i32[N_test].
    num_classes: 10 or 100 for CIFAR.
    mean: f32[C] per-channel mean in [0, 1] units used for normalisation.
    std: f32[C] per-channel standard deviation in [0, 1] units.
    source: where the data was read from (a folder or file, or ``tfds:<name>``).
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  source: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images."""
    return tuple(int(d) for d in self.train_images.shape[1:])


def _dataset_info(name: str):
  if name not in _DATASETS:
    raise DatasetError(
        f'config.data.name={name!r} is not a CIFAR layout of config.data.source="local"; use one '
        f'of {sorted(_DATASETS)}, or set config.data.source to "tfds" (a TFDS name), "npz" or '
        f'"folder" for other data.')
  return _DATASETS[name]


# ---------------------------------------------------------------------------
# Local folders in the official layouts.
# ---------------------------------------------------------------------------


def default_data_dir() -> str:
  """``$BNAS_DATA_DIR`` if set, else ``~/.cache/bnas_jax`` (expanded)."""
  return os.path.expanduser(os.environ.get('BNAS_DATA_DIR') or DEFAULT_CACHE)


def _layout_files(name: str, kind: str) -> tuple[str, str]:
  """(train file pattern or name, test file name) of a layout kind ('bin' | 'py')."""
  if name == 'cifar10':
    return ('data_batch_{}.bin', 'test_batch.bin') if kind == 'bin' else ('data_batch_{}', 'test_batch')
  return ('train.bin', 'test.bin') if kind == 'bin' else ('train', 'test')


def find_layout(name: str, data_dir: str) -> tuple[str, str]:
  """Locates the official layout folder of ``name`` under ``data_dir``.

  Args:
    name: ``'cifar10'`` or ``'cifar100'``.
    data_dir: the layout folder itself (e.g. ``.../cifar-10-batches-bin``, any name as long as it
      holds the layout's files) or its parent.

  Returns:
    ``(kind, folder)`` with kind ``'bin'`` (binary records) or ``'py'`` (pickles). The binary
    layout is preferred when the parent holds both.

  Raises:
    DatasetNotFoundError: ``data_dir`` does not exist or holds no layout of ``name``.
  """
  _, _, _, bin_dir, py_dir = _dataset_info(name)
  data_dir = os.path.expanduser(data_dir)
  if not os.path.isdir(data_dir):
    raise DatasetNotFoundError(
        f'{name}: data directory {data_dir!r} does not exist. Expected a folder {bin_dir!r} or '
        f'{py_dir!r} (official layouts) or its parent; set config.data.data_dir '
        f'(`make data-shared` builds CIFAR-10 into {default_data_dir()!r}).')
  base = os.path.basename(os.path.normpath(data_dir))
  candidates = []
  for kind, folder in (('bin', bin_dir), ('py', py_dir)):
    if base == folder:
      return kind, data_dir
    candidates.append((kind, os.path.join(data_dir, folder)))
  for kind, folder in candidates:
    if os.path.isdir(folder):
      return kind, folder
  for kind in ('bin', 'py'):  # A renamed layout folder: recognise it by its test file.
    if os.path.isfile(os.path.join(data_dir, _layout_files(name, kind)[1])):
      return kind, data_dir
  raise DatasetNotFoundError(
      f'{name}: found neither {bin_dir!r} nor {py_dir!r} in {data_dir!r} (nor their files '
      f'directly in it). Point config.data.data_dir at the layout folder or its parent.')


def _open_check(path: str, what: str, folder: bool = False) -> None:
  """Opens `path`: lists it if `folder`, else reads a byte of it (a folder there cannot be read).

  Raises:
    DatasetNotFoundError / DatasetError: `path` is missing / cannot be read; the message starts
      with `what` and names config.data.data_dir as the fix.
  """
  try:
    if folder:
      os.listdir(path)
    else:
      with open(path, 'rb') as f:
        f.read(1)
  except FileNotFoundError:
    raise DatasetNotFoundError(f'{what} {path!r} does not exist; point config.data.data_dir at '
                               'the data.') from None
  except OSError as e:
    raise DatasetError(f'{what} {path!r} cannot be read ({e.strerror or type(e).__name__}); fix '
                       'its permissions or point config.data.data_dir at readable data.') from None


def check_data(data_cfg: ml_collections.ConfigDict | Mapping) -> str:
  """Checks, without reading the records, that the data ``config.data`` names is there.

  Source ``'local'``: the layout folder is located (`find_layout`; ``data_dir`` None means
  `default_data_dir`) and every file `load_local` reads is opened. Other sources: ``data_dir``,
  when set, is opened (a file is read from, a folder listed); unset, the loader decides.

  Returns:
    The path checked (the layout folder for ``'local'``), or ``''`` when nothing was named.

  Raises:
    DatasetNotFoundError: a missing folder or file. DatasetError: an unreadable one, or an
      unknown ``name`` of source ``'local'``. One line naming config.data.data_dir and the fix.
  """
  get = data_cfg.get
  data_dir = get('data_dir', None)
  if get('source', 'local') != 'local':
    if not data_dir:
      return ''
    path = os.path.expanduser(data_dir)
    _open_check(path, 'config.data.data_dir:', folder=os.path.isdir(path))
    return path
  name = get('name', 'cifar10')
  kind, folder = find_layout(name, data_dir if data_dir is not None else default_data_dir())
  _open_check(folder, f'{name} data folder', folder=True)
  train_pattern, test_name = _layout_files(name, kind)
  if name == 'cifar10':  # data_batch_1, data_batch_2, ... (consecutive, at least one).
    train = [os.path.join(folder, train_pattern.format(1))]
    while os.path.exists(os.path.join(folder, train_pattern.format(len(train) + 1))):
      train.append(os.path.join(folder, train_pattern.format(len(train) + 1)))
  else:
    train = [os.path.join(folder, train_pattern)]
  for path in train + [os.path.join(folder, test_name)]:
    _open_check(path, f'{name} data file')
  return folder


def _read_bin(path: str, num_classes: int, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads one binary file: records of ``label_bytes`` label bytes + 3,072 pixel bytes."""
  record = label_bytes + _PIXELS
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'missing data file {path!r}.')
  size = os.path.getsize(path)
  if size == 0 or size % record:
    raise DatasetError(
        f'{path!r} has {size:,} bytes, not a positive multiple of the record size {record:,} '
        f'({label_bytes} label byte(s) + {_PIXELS} pixels): the file is truncated or not a '
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
  if data.ndim != 2 or data.shape[1] != _PIXELS or labels.shape != (data.shape[0],):
    raise DatasetError(
        f'{path!r}: expected b"data" u8[N, {_PIXELS}] and N labels, found data shape '
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
  num_classes, mean, std, _, _ = _dataset_info(name)
  kind, folder = find_layout(name, data_dir if data_dir is not None else default_data_dir())
  train_pattern, test_name = _layout_files(name, kind)
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
          f'`pip install -e .[prepare]` and `python -m bnas_jax.input_pipeline prepare --name '
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
    if name in _DATASETS and images.shape[1:] != IMAGE_SHAPE:
      raise DatasetError(f'TFDS {name} {split}: expected images {IMAGE_SHAPE}, got {images.shape[1:]}.')
    arrays[split] = (images, labels)
  if num_classes is None:
    num_classes = int(max(arrays[k][1].max(initial=-1) for k in ('train', 'test'))) + 1
  for split, (_, labels) in arrays.items():
    _check_labels(labels, num_classes, f'tfds:{name}/{split}')
  if name in _DATASETS:
    _, mean, std, _, _ = _DATASETS[name]
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


def check_image_shape(image_shape: Sequence[int]) -> None:
  """Raises `DatasetError` unless both sides of ``(H, W, C)`` images are divisible by 4: the
  search and evaluation networks halve them twice (two reduction stages), and their two-path
  reductions need even sides both times."""
  h, w = int(image_shape[0]), int(image_shape[1])
  if h % 4 or w % 4:
    fix = 4 * max(1, round(max(h, w) / 4))
    raise DatasetError(f'images of {h} x {w} pixels: both sides must be divisible by 4 (the '
                       f'networks halve them twice); set config.data.image_size={fix} to resize.')


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


def prepare_tfds(name: str, data_dir: str | None = None) -> None:
  """Downloads and prepares ``name`` with TFDS in the array_record format.

  Needs internet and TensorFlow (TFDS's CIFAR builder reads and encodes with it):
  ``pip install -e .[prepare]``. Not used by training.

  Raises:
    DatasetError: TensorFlow (or TFDS's download helper) is not installed.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ('tensorflow', 'importlib_resources') if importlib.util.find_spec(m) is None]
  if missing:
    raise DatasetError(f'preparing {name} with TFDS needs {missing}: run `pip install -e .[prepare]` '
                       f'(or use config.data.source="local" with a local copy).')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  print(f'prepared {name} in {builder.data_dir}')


def load_dataset(data_cfg: ml_collections.ConfigDict | Mapping) -> Dataset:
  """Loads the dataset described by ``config.data`` (fields in the module docstring).

  Raises:
    DatasetError / DatasetNotFoundError: as `load_local` / `load_tfds` / `load_npz` /
      `load_folder`, or an unknown source.
  """
  get = data_cfg.get
  name = get('name', 'cifar10')
  kwargs = dict(num_train=int(get('num_train', _OFFICIAL_COUNTS['train'])),
                num_test=int(get('num_test', _OFFICIAL_COUNTS['test'])))
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


# ---------------------------------------------------------------------------
# Building CIFAR-10 from the repository's shared/ data (tests, `make data-shared`).
# ---------------------------------------------------------------------------


def find_shared_dir() -> str:
  """The project's ``shared/`` folder: ``$BNAS_SHARED``, else ``<repo>/shared``, else
  ``<repo>/../shared`` (the repo being the folder above this package).

  Raises:
    DatasetNotFoundError: none of them exists.
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = os.environ.get('BNAS_SHARED')
  candidates = [env] if env else [os.path.join(repo, 'shared'), os.path.join(repo, '..', 'shared')]
  for c in candidates:
    if os.path.isfile(os.path.join(c, _SHARED_BUILD_SCRIPT)):
      return os.path.normpath(c)
  raise DatasetNotFoundError(
      f'no shared/ folder with {_SHARED_BUILD_SCRIPT!r} found (looked in {candidates}); set '
      f'$BNAS_SHARED to it.')


@functools.lru_cache(maxsize=None)
def _expected_bin_sizes() -> dict[str, int]:
  rec = 1 + _PIXELS
  sizes = {f'data_batch_{i}.bin': 10_000 * rec for i in range(1, 6)}
  sizes['test_batch.bin'] = 10_000 * rec
  return sizes


def _is_complete_cifar10_bin(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) == s
             for f, s in _expected_bin_sizes().items())


def build_cifar10_from_shared(parent_dir: str | None = None, shared_dir: str | None = None) -> str:
  """Builds ``<parent_dir>/cifar-10-batches-bin`` from the JPEG-derived CIFAR-10 in shared/.

  Runs ``shared/data/cifar10-jpeg-q75-derived/make_cifar10_bin.py`` (numpy + Pillow, ~11 s) into
  a temporary folder and renames it into place, under an exclusive file lock, so concurrent
  callers (pytest-xdist workers) build it once. A complete existing folder is reused.

  Args:
    parent_dir: where to put ``cifar-10-batches-bin``; None = `default_data_dir`.
    shared_dir: the shared/ folder; None = `find_shared_dir`.

  Returns:
    The path of the ``cifar-10-batches-bin`` folder.

  Raises:
    DatasetNotFoundError: no shared/ folder. DatasetError: the build script failed.
  """
  script = os.path.join(shared_dir or find_shared_dir(), _SHARED_BUILD_SCRIPT)
  if not os.path.isfile(script):
    raise DatasetNotFoundError(f'{script} does not exist: pass the shared/ folder that holds '
                               f'{_SHARED_BUILD_SCRIPT!r} (or set $BNAS_SHARED)')
  parent_dir = os.path.expanduser(parent_dir or default_data_dir())
  out = os.path.join(parent_dir, 'cifar-10-batches-bin')
  os.makedirs(parent_dir, exist_ok=True)
  with open(os.path.join(parent_dir, '.cifar-10-batches-bin.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _is_complete_cifar10_bin(out):
      return out
    with _build_into(out, '.cifar-10-batches-bin.') as tmp:
      result = subprocess.run([sys.executable, script, tmp], capture_output=True, text=True,
                              check=False)
      if result.returncode or not _is_complete_cifar10_bin(tmp):
        raise DatasetError(f'{script} {tmp} failed (exit {result.returncode}): '
                           f'{result.stderr[-2000:]}')
  return out


@contextlib.contextmanager
def _build_into(out: str, prefix: str):
  """Yields a fresh temporary folder beside `out`; when the block succeeds, it atomically replaces
  `out` (an incomplete leftover included). The temporary folder never outlives the block."""
  tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(out))
  try:
    yield tmp
    if os.path.exists(out):
      shutil.rmtree(out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


_SUBSET_FOLDER = 'cifar10-lossless-subset'
_SUBSET_FILES = {  # name in shared/data/cifar10-lossless-subset -> name in the official layout.
    'data_batch_1_first4000.bin': 'data_batch_1.bin',
    'test_batch_first1000.bin': 'test_batch.bin',
}


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def build_cifar10_subset_from_shared(parent_dir: str | None = None,
                                     shared_dir: str | None = None) -> str:
  """Copies the lossless 4,000 / 1,000 CIFAR-10 subset of shared/ into the official binary layout.

  The result, ``<parent_dir>/cifar10-lossless-subset/cifar-10-batches-bin`` with
  ``data_batch_1.bin`` (the first 4,000 training records, original pixels) and ``test_batch.bin``
  (the first 1,000 test records), loads with ``num_train=4000, num_test=1000`` (the
  ``experiments/tiny.py`` config). Files are checked against the subset's SHA256SUMS; the copy is
  made under a file lock into a temporary folder and renamed into place; a complete copy is reused.

  Args:
    parent_dir: cache folder; None = `default_data_dir`.
    shared_dir: the shared/ folder; None = `find_shared_dir`.

  Returns:
    The path of the subset's ``cifar-10-batches-bin`` folder.

  Raises:
    DatasetNotFoundError: no shared/ folder. DatasetError: a file does not match SHA256SUMS.
  """
  src = os.path.join(shared_dir or find_shared_dir(), 'data', _SUBSET_FOLDER)
  if not os.path.isfile(os.path.join(src, 'SHA256SUMS')):
    raise DatasetNotFoundError(f'{src}/SHA256SUMS does not exist: pass the shared/ folder that '
                               f'holds data/{_SUBSET_FOLDER} (or set $BNAS_SHARED)')
  parent = os.path.join(os.path.expanduser(parent_dir or default_data_dir()), _SUBSET_FOLDER)
  out = os.path.join(parent, 'cifar-10-batches-bin')
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    sums = {}
    with open(os.path.join(src, 'SHA256SUMS')) as f:
      for line in f:
        digest, name = line.split()
        sums[name] = digest
    if all(os.path.isfile(os.path.join(out, dst)) and _sha256(os.path.join(out, dst)) == sums[s]
           for s, dst in _SUBSET_FILES.items()):
      return out
    with _build_into(out, '.build.') as tmp:
      for s, dst in _SUBSET_FILES.items():
        if _sha256(os.path.join(src, s)) != sums[s]:
          raise DatasetError(f'{os.path.join(src, s)} does not match its SHA256SUMS entry.')
        shutil.copyfile(os.path.join(src, s), os.path.join(tmp, dst))
  return out


# ---------------------------------------------------------------------------
# Seeded permutations and splits (host, numpy).
# ---------------------------------------------------------------------------

_U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 (Steele, Lea & Flood 2014; Vigna's reference code): one output per input state.

  ``splitmix64(s)`` is the first output of a SplitMix64 generator seeded with state ``s``.

  Args:
    x: u64[...] states.

  Returns:
    u64[...] hashes.
  """
  with np.errstate(over='ignore'):
    z = np.asarray(x, _U64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _stream(*words: int) -> np.uint64:
  """A 64-bit stream id from non-negative integers (hash chaining)."""
  h = _U64(0)
  for w in words:
    if w < 0:
      raise DatasetError(f'seeds, epochs and steps must be >= 0, got {w}.')
    h = splitmix64(h ^ _U64(w % (1 << 64)))
  return h


def stable_permutation(n: int, *seeds: int) -> np.ndarray:
  """A permutation of ``range(n)`` determined by ``seeds`` alone.

  Sorts ``splitmix64(stream(seeds) + i)``; unlike numpy's Generators this is bit-identical on
  every platform and numpy version.

  Returns:
    i64[n].
  """
  with np.errstate(over='ignore'):
    keys = splitmix64(_stream(*seeds) + np.arange(n, dtype=_U64))
  return np.argsort(keys, kind='stable')


_SPLIT_TAG, _SHUFFLE_TAG = 0x5B117, 0x5BFF1E  # Separate the split and shuffle streams.


def split_train(num_examples: int, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
  """Seeded, disjoint subsets of ``range(num_examples)`` (training-set indices), by name.

  Args:
    num_examples: size of the training set.
    sizes: ``{split name: size}``; the splits take consecutive chunks of one seeded permutation in
      this order, so a split depends only on the seed and the sizes before it.
    seed: the data seed.

  Returns:
    ``{name: i64[size]}`` sorted indices (sorted for locality; `epoch_batches` shuffles).

  Raises:
    DatasetError: a negative size, or sizes summing to more than ``num_examples``.
  """
  sizes = dict(sizes)
  if any(int(s) < 0 for s in sizes.values()) or sum(int(s) for s in sizes.values()) > num_examples:
    raise DatasetError(
        f'config.data.splits={sizes} do not fit into the {num_examples:,} training examples '
        f'(sizes must be >= 0 and sum to at most {num_examples:,}, here {sum(sizes.values()):,}).')
  perm = stable_permutation(num_examples, _SPLIT_TAG, seed)
  out, start = {}, 0
  for name, size in sizes.items():
    out[name] = np.sort(perm[start:start + int(size)])
    start += int(size)
  return out


def make_splits(dataset: Dataset, sizes: Mapping[str, int], seed: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{name: (u8[n, H, W, C] images, i32[n] labels)}`` for the `split_train` splits."""
  idx = split_train(len(dataset.train_labels), sizes, seed)
  return {k: (dataset.train_images[v], dataset.train_labels[v]) for k, v in idx.items()}


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle order i64[n] of epoch ``epoch`` of an ``n``-example set."""
  return stable_permutation(n, _SHUFFLE_TAG, seed, epoch)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches in one epoch."""
  if batch_size <= 0:
    raise DatasetError(f'batch_size must be positive, got {batch_size}.')
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


# ---------------------------------------------------------------------------
# Augmentation (device, jax.random).
# ---------------------------------------------------------------------------


def batch_key(seed: int, epoch: int, step: int) -> jax.Array:
  """The augmentation key of batch ``step`` of ``epoch``: fold_in(fold_in(key(seed), epoch), step)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), step)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """u8[B, H, W, C] pixels -> f32[B, H, W, C] ``(x / 255 - mean) / std`` (per channel)."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, mean: jax.Array, std: jax.Array, *,
            crop_padding: int = 4, flip: bool = True, cutout: int = 0) -> jax.Array:
  """Random crop + flip, normalisation, cutout (DARTS / spec section 5), per example.

  Args:
    key: a PRNG key (use `batch_key`).
    images: u8[B, H, W, C].
    mean: f32[C] per-channel mean in [0, 1] units.
    std: f32[C] per-channel std.
    crop_padding: zero-pad each side by this many pixels (in pixel space, before normalisation)
      and crop a random HxW window; 0 = no crop.
    flip: mirror left-right with probability 1/2.
    cutout: side of the square set to 0 after normalisation, centred uniformly in the image and
      clipped at the borders (rows ``[cy - cutout//2, cy + cutout//2)``); 0 = off.

  Returns:
    f32[B, H, W, C].
  """
  b, h, w, _ = images.shape
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  x = images
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
        padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(do_flip[:, None, None, None], x[:, :, ::-1, :], x)
  x = normalize(x, mean, std)
  if cutout:
    centre = jax.random.randint(k_cut, (b, 2), 0, jnp.array([h, w]))
    rows = jnp.arange(h)[None, :] - centre[:, :1]
    cols = jnp.arange(w)[None, :] - centre[:, 1:]
    half = cutout // 2
    in_rows = (rows >= -half) & (rows < cutout - half)
    in_cols = (cols >= -half) & (cols < cutout - half)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    x = jnp.where(hole[..., None], 0.0, x)
  return x


def _transform(images, seed, epoch, step, mean, std, *, train: bool, cutout: int):
  if not train:
    return normalize(images, mean, std)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), step)
  return augment(key, images, mean, std, cutout=cutout)


@functools.lru_cache(maxsize=None)
def _transform_fn(sharding: jax.sharding.Sharding | None):
  kw = {} if sharding is None else {'out_shardings': sharding}
  return jax.jit(_transform, static_argnames=('train', 'cutout'), **kw)


# ---------------------------------------------------------------------------
# Data parallelism.
# ---------------------------------------------------------------------------


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``'data'``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P('data'))``: arrays split along their leading (batch) axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _num_shards(sharding: jax.sharding.Sharding, batch_size: int) -> int:
  n = len(sharding.device_set)
  if batch_size % n:
    raise DatasetError(
        f'batch size {batch_size} is not divisible by the {n} devices of the data sharding; use a '
        f'multiple of {n} (or fewer devices).')
  return n


def _local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
  """The rows of a global batch held by this process's devices (contiguous for `make_mesh`)."""
  if jax.process_count() == 1:
    return slice(0, batch_size)
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Places process-local host arrays as global arrays split along the batch axis.

  Args:
    batch: ``{key: array[B_local, ...]}``; on one process ``B_local`` is the global batch size.
    sharding: usually `batch_sharding` ``(make_mesh())``.
    global_batch_size: the global batch size (default: ``B_local * process_count``).

  Returns:
    ``{key: jax.Array[B, ...]}`` with ``sharding`` (a plain ``device_put`` on one process).

  Raises:
    DatasetError: the global batch size is not divisible by the number of devices.
  """
  out = {}
  for k, v in batch.items():
    b = global_batch_size or v.shape[0] * jax.process_count()
    _num_shards(sharding, b)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v, (b,) + v.shape[1:])
  return out


# ---------------------------------------------------------------------------
# Epoch iterator.
# ---------------------------------------------------------------------------


def epoch_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                  epoch: int, mean: Sequence[float] | np.ndarray,
                  std: Sequence[float] | np.ndarray, augment: bool = False,  # pylint: disable=redefined-outer-name
                  cutout: int = 0, shuffle: bool = True, start_step: int = 0,
                  drop_remainder: bool = True,
                  sharding: jax.sharding.Sharding | None = None) -> Iterator[dict[str, jax.Array]]:
  """Iterates over one epoch of ``(images, labels)`` in batches, on device.

  Batch ``step`` of ``epoch`` holds examples ``perm[step * B:(step + 1) * B]`` with
  ``perm = epoch_permutation(N, seed, epoch)`` (or ``arange(N)`` when ``shuffle=False``) and is
  augmented with key `batch_key` ``(seed, epoch, step)``, so the batches depend only on
  ``(seed, epoch, step)``: starting at ``start_step`` gives exactly the tail of a full epoch.

  Args:
    images: u8[N, H, W, C] host array (e.g. one split from `make_splits`).
    labels: int[N].
    batch_size: global batch size B.
    seed: data seed (shuffle and augmentation).
    epoch: epoch number (>= 0).
    mean: f32[C] normalisation mean in [0, 1] units (``Dataset.mean``).
    std: f32[C] normalisation std (``Dataset.std``).
    augment: random crop (pad 4) + flip + cutout; False = normalisation only.
    cutout: cutout side when ``augment`` (0 = off).
    shuffle: shuffle with `epoch_permutation`; False = file order (evaluation).
    start_step: first batch to yield (resume mid-epoch); ``0 <= start_step <= steps``.
    drop_remainder: drop the last partial batch. If False, the last batch is padded to B with
      copies of example 0 and every batch carries ``'mask': f32[B]`` (1 = real example, 0 = pad).
    sharding: where to put each batch (e.g. `batch_sharding` ``(make_mesh())``); None = default
      device. With several processes each one reads only its own rows.

  Yields:
    ``{'image': f32[B, H, W, C], 'label': i32[B]}`` (+ ``'mask'``), placed per ``sharding``.

  Raises:
    DatasetError: mismatched inputs, a batch size not divisible by the device count, a seed or
      epoch outside [0, 2**31), or a ``start_step`` outside the epoch.
  """
  n = len(labels)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) != n:
    raise DatasetError(f'epoch_batches expects u8[N, H, W, C] images and N labels, got '
                       f'{images.dtype}{list(images.shape)} and {len(labels)} labels.')
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if not (0 <= seed < 2**31 and 0 <= epoch < 2**31):
    raise DatasetError(f'seed={seed} and epoch={epoch} must lie in [0, 2**31).')
  if not 0 <= start_step <= steps:
    raise DatasetError(f'start_step={start_step} outside [0, {steps}] (steps in this epoch).')
  rows = slice(0, batch_size)
  if sharding is not None:
    _num_shards(sharding, batch_size)
    rows = _local_rows(sharding, batch_size)
  order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  fn = _transform_fn(sharding)
  for step in range(start_step, steps):
    idx = order[step * batch_size:(step + 1) * batch_size]
    valid = len(idx)
    if valid < batch_size:
      idx = np.concatenate([idx, np.zeros(batch_size - valid, idx.dtype)])
    idx = idx[rows]
    host = {'image': images[idx], 'label': np.asarray(labels[idx], np.int32)}
    if not drop_remainder:
      host['mask'] = (np.arange(batch_size)[rows] < valid).astype(np.float32)
    if sharding is not None:
      host = shard_batch(host, sharding, batch_size)
    out = dict(host)
    out['image'] = fn(host['image'], np.int32(seed), np.int32(epoch), np.int32(step), mean, std,
                      train=augment, cutout=int(cutout) if augment else 0)
    if sharding is None:
      out = {k: jnp.asarray(v) for k, v in out.items()}
    yield out


# ---------------------------------------------------------------------------
# Command line: prepare (TFDS), build-shared / build-subset (local binary from shared/), check.
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m bnas_jax.input_pipeline',
                                   description='Prepare or check data for bnas_jax.')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('prepare', help='download + prepare with TFDS (array_record); needs '
                     'internet and `pip install -e .[prepare]`')
  p.add_argument('--name', default='cifar10', help='TFDS name (default cifar10)')
  p.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  b = sub.add_parser('build-shared', help='build cifar-10-batches-bin from shared/ (JPEG-derived)')
  b.add_argument('--data_dir', default=None, help=f'parent folder (default {default_data_dir()})')
  b.add_argument('--shared', default=None, help='shared/ folder (default: found automatically)')
  bs = sub.add_parser('build-subset', help='copy the lossless 4,000 / 1,000 subset of shared/ into '
                      '<data_dir>/cifar10-lossless-subset/cifar-10-batches-bin (experiments/tiny.py)')
  bs.add_argument('--data_dir', default=None, help=f'parent folder (default {default_data_dir()})')
  bs.add_argument('--shared', default=None, help='shared/ folder (default: found automatically)')
  c = sub.add_parser('check', help='load a dataset and print a summary')
  c.add_argument('--name', default='cifar10')
  c.add_argument('--source', default='local', choices=['local', 'tfds', 'npz', 'folder'])
  c.add_argument('--data_dir', default=None)
  c.add_argument('--num_train', type=int, default=_OFFICIAL_COUNTS['train'], help='-1: any')
  c.add_argument('--num_test', type=int, default=_OFFICIAL_COUNTS['test'], help='-1: any')
  c.add_argument('--image_size', type=int, default=0, help='> 0: resize to this size')
  args = parser.parse_args(argv)
  try:
    return _run_command(args)
  except (DatasetError, FileNotFoundError) as e:  # bad input, named in the message
    print(f'python -m bnas_jax.input_pipeline {args.command}: error: {e}', file=sys.stderr)
    return 2


def _run_command(args) -> int:
  if args.command == 'prepare':
    prepare_tfds(args.name, args.data_dir)
  elif args.command == 'build-shared':
    print(build_cifar10_from_shared(args.data_dir, args.shared))
  elif args.command == 'build-subset':
    print(build_cifar10_subset_from_shared(args.data_dir, args.shared))
  else:
    ds = load_dataset({'name': args.name, 'source': args.source, 'data_dir': args.data_dir,
                       'num_train': args.num_train, 'num_test': args.num_test,
                       'image_size': args.image_size})
    print(f'{ds.name} from {ds.source}: train {ds.train_images.shape} test {ds.test_images.shape} '
          f'classes {ds.num_classes} train counts {np.bincount(ds.train_labels).tolist()} '
          f'mean {np.round(ds.mean, 4).tolist()} std {np.round(ds.std, 4).tolist()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
