"""Preparing data: TFDS downloads, CIFAR-10 built from the project's shared/ folder, and the command
line (``python -m bnas_jax.data.prepare prepare|build-shared|build-subset|check``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np

from bnas_jax.data.dataset import (CIFAR_PIXELS, OFFICIAL_COUNTS, DatasetError, DatasetNotFoundError,
                                   default_data_dir)
from bnas_jax.data.readers import load_dataset

_SHARED_BUILD_SCRIPT = os.path.join('data', 'cifar10-jpeg-q75-derived', 'make_cifar10_bin.py')


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


# ---------------------------------------------------------------------------
# Building CIFAR-10 from the repository's shared/ data (tests, `make data-shared`).
# ---------------------------------------------------------------------------


def find_shared_dir() -> str:
  """The project's ``shared/`` folder: ``$BNAS_SHARED``, else ``<repo>/shared``, else
  ``<repo>/../shared`` (the repo being the folder above the ``bnas_jax`` package).

  Raises:
    DatasetNotFoundError: none of them exists.
  """
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  rec = 1 + CIFAR_PIXELS
  sizes = {f'data_batch_{i}.bin': 10_000 * rec for i in range(1, 6)}
  sizes['test_batch.bin'] = 10_000 * rec
  return sizes


def _is_complete_cifar10_bin(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) == s
             for f, s in _expected_bin_sizes().items())


def build_cifar10_from_shared(parent_dir: str | None = None, shared_dir: str | None = None) -> str:
  """Builds ``<parent_dir>/cifar-10-batches-bin`` from the JPEG-derived CIFAR-10 in shared/.

  Runs ``shared/data/cifar10-jpeg-q75-derived/make_cifar10_bin.py`` (numpy + Pillow) into
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
# Command line: prepare (TFDS), build-shared / build-subset (local binary from shared/), check.
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m bnas_jax.data.prepare',
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
  c.add_argument('--num_train', type=int, default=OFFICIAL_COUNTS['train'], help='-1: any')
  c.add_argument('--num_test', type=int, default=OFFICIAL_COUNTS['test'], help='-1: any')
  c.add_argument('--image_size', type=int, default=0, help='> 0: resize to this size')
  args = parser.parse_args(argv)
  try:
    return _run_command(args)
  except (DatasetError, FileNotFoundError) as e:  # bad input, named in the message
    msg = str(e)
    if args.command == 'check':  # the loader names config fields; here they are this command's flags
      msg = re.sub(r'(config\.data\.|\b)num_train / num_test', '--num_train / --num_test', msg)
      msg = msg.replace('config.data.', '--')
    print(f'python -m bnas_jax.data.prepare {args.command}: error: {msg}', file=sys.stderr)
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
