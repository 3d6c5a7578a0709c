"""Data sets: the ``config.data`` fields, the `Dataset` type, its errors, and the check that the
data a config names is there (`check_data`), run before anything is created.

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

Errors: every problem with the data (missing folder, wrong or truncated file, wrong record count,
split sizes that do not fit, batch size not divisible by the device count) raises `DatasetError`
(a ``ValueError``); a missing path raises its subclass `DatasetNotFoundError` (also a
``FileNotFoundError``). The message names the path or input and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import ml_collections
import numpy as np

# Official per-channel statistics of the training sets, in [0, 1] units.
# CIFAR-10: spec section 5. CIFAR-100: the values used by DARTS (utils.py) and most NAS code.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGE_SHAPE = (32, 32, 3)
CIFAR_PIXELS = 32 * 32 * 3

# name -> (num_classes, mean, std, binary layout folder, pickle layout folder)
CIFAR_DATASETS = {
    'cifar10': (10, CIFAR10_MEAN, CIFAR10_STD, 'cifar-10-batches-bin', 'cifar-10-batches-py'),
    'cifar100': (100, CIFAR100_MEAN, CIFAR100_STD, 'cifar-100-binary', 'cifar-100-python'),
}
OFFICIAL_COUNTS = {'train': 50_000, 'test': 10_000}
DEFAULT_CACHE = os.path.join('~', '.cache', 'bnas_jax')


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
  config.num_train = OFFICIAL_COUNTS['train']
  config.num_test = OFFICIAL_COUNTS['test']
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


def cifar_info(name: str):
  if name not in CIFAR_DATASETS:
    raise DatasetError(
        f'config.data.name={name!r} is not a CIFAR layout of config.data.source="local"; use one '
        f'of {sorted(CIFAR_DATASETS)}, or set config.data.source to "tfds" (a TFDS name), "npz" or '
        f'"folder" for other data.')
  return CIFAR_DATASETS[name]




def default_data_dir() -> str:
  """``$BNAS_DATA_DIR`` if set, else ``~/.cache/bnas_jax`` (expanded)."""
  return os.path.expanduser(os.environ.get('BNAS_DATA_DIR') or DEFAULT_CACHE)


def layout_files(name: str, kind: str) -> tuple[str, str]:
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
  _, _, _, bin_dir, py_dir = cifar_info(name)
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
    if os.path.isfile(os.path.join(data_dir, layout_files(name, kind)[1])):
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
  train_pattern, test_name = layout_files(name, kind)
  if name == 'cifar10':  # data_batch_1, data_batch_2, ... (consecutive, at least one).
    train = [os.path.join(folder, train_pattern.format(1))]
    while os.path.exists(os.path.join(folder, train_pattern.format(len(train) + 1))):
      train.append(os.path.join(folder, train_pattern.format(len(train) + 1)))
  else:
    train = [os.path.join(folder, train_pattern)]
  for path in train + [os.path.join(folder, test_name)]:
    _open_check(path, f'{name} data file')
  return folder


def check_image_shape(image_shape: Sequence[int]) -> None:
  """Raises `DatasetError` unless both sides of ``(H, W, C)`` images are divisible by 4: the
  search and evaluation networks halve them twice (two reduction stages), and their two-path
  reductions need even sides both times."""
  h, w = int(image_shape[0]), int(image_shape[1])
  if h % 4 or w % 4:
    fix = 4 * max(1, round(max(h, w) / 4))
    raise DatasetError(f'images of {h} x {w} pixels: both sides must be divisible by 4 (the '
                       f'networks halve them twice); set config.data.image_size={fix} to resize.')

