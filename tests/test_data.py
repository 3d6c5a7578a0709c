"""Tests of the data package (`bnas_jax.data`: dataset, readers, prepare, pipeline, sharding) on the
real CIFAR-10 data (fixtures in conftest.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from bnas_jax.data import dataset
from bnas_jax.data import pipeline
from bnas_jax.data import prepare
from bnas_jax.data import readers
from bnas_jax.data import sharding as sharding_lib

SIZES = {'warmup': 5_000, 'search': 40_000, 'val': 5_000}
MEAN, STD = np.asarray(dataset.CIFAR10_MEAN, np.float32), np.asarray(dataset.CIFAR10_STD, np.float32)


def epoch_batches(images, labels, *, epoch, start_step=0, **loader):
  """The batches of `epoch` from a `pipeline.Loader` of the other arguments."""
  return pipeline.Loader(images, labels, **loader).epoch(epoch, start_step)


@pytest.fixture(scope='module')
def full(cifar10_bin_dir):
  return readers.load_local('cifar10', cifar10_bin_dir)


@pytest.fixture(scope='module')
def subset(cifar10_subset_dir):
  return readers.load_local('cifar10', cifar10_subset_dir, num_train=4000, num_test=1000)


@pytest.fixture(scope='module')
def index_tsv(shared_dir):
  """(split, index) -> label from the JPEG archive's index (an independent label source)."""
  path = os.path.join(shared_dir, 'data', 'cifar10-jpeg-q75-derived', 'index.tsv.gz')
  with gzip.open(path, 'rt') as f:
    rows = [line.rstrip('\n').split('\t') for line in f][1:]
  out = {'train': np.zeros(50_000, np.int32), 'test': np.zeros(10_000, np.int32)}
  for split, index, label, *_ in rows:
    out[split][int(index)] = int(label)
  return out


def _denormalize(x):
  return np.round((np.asarray(x, np.float64) * STD + MEAN) * 255.0)


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def test_full_dataset_counts_labels_and_pixels(full, index_tsv, shared_dir):
  assert full.train_images.shape == (50_000, 32, 32, 3) and full.train_images.dtype == np.uint8
  assert full.test_images.shape == (10_000, 32, 32, 3) and full.test_images.dtype == np.uint8
  assert full.num_classes == 10
  np.testing.assert_array_equal(np.bincount(full.train_labels, minlength=10), [5_000] * 10)
  np.testing.assert_array_equal(np.bincount(full.test_labels, minlength=10), [1_000] * 10)
  np.testing.assert_array_equal(full.train_labels, index_tsv['train'])
  np.testing.assert_array_equal(full.test_labels, index_tsv['test'])
  # Pixel layout: the first JPEGs of the archive decoded with PIL (independent of the reader).
  tar_path = os.path.join(shared_dir, 'data', 'cifar10-jpeg-q75-derived', 'cifar10-jpeg-q75.tar.gz')
  with tarfile.open(tar_path, 'r:gz') as tf:
    for member, _ in zip(tf, range(3)):
      split, base = member.name.split('/')
      idx, label = map(int, base[:-4].split('_'))
      ref = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert('RGB'))
      images = full.train_images if split == 'train' else full.test_images
      np.testing.assert_array_equal(images[idx], ref)
      assert (full.train_labels if split == 'train' else full.test_labels)[idx] == label


def test_lossless_subset_known_labels_and_pixels(subset, full, index_tsv):
  assert subset.train_images.shape == (4_000, 32, 32, 3)
  assert subset.test_images.shape == (1_000, 32, 32, 3)
  # Published first labels of data_batch_1 (frog truck truck deer car car bird horse ship cat)
  # and test_batch (cat ship ship plane frog frog car frog cat car).
  np.testing.assert_array_equal(subset.train_labels[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
  np.testing.assert_array_equal(subset.test_labels[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
  np.testing.assert_array_equal(subset.train_labels, index_tsv['train'][:4000])
  np.testing.assert_array_equal(subset.test_labels, index_tsv['test'][:1000])
  # Same images as the JPEG-derived set: README gives MAE 5.8/255 against the lossless originals.
  mae = np.abs(subset.train_images.astype(np.float64) - full.train_images[:4000]).mean()
  assert 4.5 < mae < 7.5, mae
  mae_test = np.abs(subset.test_images.astype(np.float64) - full.test_images[:1000]).mean()
  assert 4.5 < mae_test < 7.5, mae_test


def test_normalised_training_split_statistics(full):
  images, labels = pipeline.make_splits(full, SIZES, seed=0)['search']
  total = np.zeros(3)
  total_sq = np.zeros(3)
  for batch in epoch_batches(images, labels, batch_size=2_000, seed=0, epoch=0, mean=full.mean,
                                std=full.std, shuffle=False):
    x = np.asarray(batch['image'], np.float64).reshape(-1, 3)
    total += x.sum(0)
    total_sq += (x * x).sum(0)
  count = len(labels) * 32 * 32
  mean = total / count
  std = np.sqrt(total_sq / count - mean**2)
  # JPEG-derived pixels: mean (0.4913, 0.4821, 0.4465) and std (0.2452, 0.2428, 0.2606) against
  # the official constants, i.e. about -0.0005 and 0.99 in normalised units.
  np.testing.assert_allclose(mean, 0.0, atol=0.01)
  np.testing.assert_allclose(std, 1.0, atol=0.02)


def test_parent_dir_and_layout_dir_both_work(cifar10_subset_dir, subset):
  parent = os.path.dirname(cifar10_subset_dir)
  again = readers.load_dataset({'source': 'local', 'name': 'cifar10', 'data_dir': parent,
                           'num_train': 4000, 'num_test': 1000})
  np.testing.assert_array_equal(again.train_images, subset.train_images)
  np.testing.assert_array_equal(again.test_labels, subset.test_labels)


def _layout_with(tmp_path, src_dir, replace: dict[str, bytes | None]):
  """A copy of a layout folder in tmp_path (symlinks), with some files replaced or removed."""
  out = tmp_path / 'cifar-10-batches-bin'
  out.mkdir(parents=True)
  for name in os.listdir(src_dir):
    if name in replace:
      if replace[name] is not None:
        (out / name).write_bytes(replace[name])
    else:
      (out / name).symlink_to(os.path.join(src_dir, name))
  return str(out)


def test_missing_path_is_a_clear_error(tmp_path):
  missing = str(tmp_path / 'no_such_dir')
  with pytest.raises(dataset.DatasetNotFoundError, match='no_such_dir.*does not exist'):
    readers.load_local('cifar10', missing)
  with pytest.raises(FileNotFoundError):
    readers.load_local('cifar10', missing)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(dataset.DatasetNotFoundError, match="cifar-10-batches-bin"):
    readers.load_local('cifar10', str(tmp_path / 'empty'))


def test_truncated_and_short_files_are_clear_errors(tmp_path, cifar10_bin_dir):
  batch3 = open(os.path.join(cifar10_bin_dir, 'data_batch_3.bin'), 'rb').read()
  cut_mid_record = _layout_with(tmp_path / 'a', cifar10_bin_dir,
                                {'data_batch_3.bin': batch3[:1_000_000]})
  with pytest.raises(dataset.DatasetError, match=r'data_batch_3\.bin.*1,000,000 bytes.*3,073'):
    readers.load_local('cifar10', cut_mid_record)
  one_record_short = _layout_with(tmp_path / 'b', cifar10_bin_dir,
                                  {'data_batch_3.bin': batch3[:-3073]})
  with pytest.raises(dataset.DatasetError, match=r'expected 50,000 records, found 49,999.*data_batch_3'):
    readers.load_local('cifar10', one_record_short)
  no_test = _layout_with(tmp_path / 'c', cifar10_bin_dir, {'test_batch.bin': None})
  with pytest.raises(dataset.DatasetNotFoundError, match=r'test_batch\.bin'):
    readers.load_local('cifar10', no_test)
  no_batch5 = _layout_with(tmp_path / 'd', cifar10_bin_dir, {'data_batch_5.bin': None})
  with pytest.raises(dataset.DatasetError, match=r'expected 50,000 records, found 40,000'):
    readers.load_local('cifar10', no_batch5)
  # More records than the config expects (the full set where a subset config was written for a
  # subset folder): the fix named is the data folder, not a truncated file.
  with pytest.raises(dataset.DatasetError, match=r'expected 4,000 records \(config.data.num_train / '
                     r'num_test\), found 50,000 .*Point config.data.data_dir at the folder'):
    readers.load_local('cifar10', cifar10_bin_dir, num_train=4_000)


def _write_py_layout(folder, name, parts: dict[str, dict]):
  folder.mkdir(parents=True)
  for fname, entry in parts.items():
    with open(folder / fname, 'wb') as f:
      pickle.dump(entry, f)


def _planes(images):
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_python_pickle_layout_cifar10(tmp_path, subset):
  folder = tmp_path / 'cifar-10-batches-py'
  _write_py_layout(folder, 'cifar10', {
      'data_batch_1': {b'data': _planes(subset.train_images[:2500]),
                       b'labels': subset.train_labels[:2500].tolist()},
      'data_batch_2': {b'data': _planes(subset.train_images[2500:]),
                       b'labels': subset.train_labels[2500:].tolist()},
      'test_batch': {b'data': _planes(subset.test_images), b'labels': subset.test_labels.tolist()},
  })
  ds = readers.load_local('cifar10', str(tmp_path), num_train=4000, num_test=1000)
  np.testing.assert_array_equal(ds.train_images, subset.train_images)
  np.testing.assert_array_equal(ds.train_labels, subset.train_labels)
  np.testing.assert_array_equal(ds.test_images, subset.test_images)
  raw = (folder / 'test_batch').read_bytes()
  (folder / 'test_batch').write_bytes(raw[:len(raw) // 2])
  with pytest.raises(dataset.DatasetError, match=r'test_batch.*truncated'):
    readers.load_local('cifar10', str(folder), num_train=4000, num_test=1000)


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes what Python 2's ``cPickle.dump(obj, f, 2)`` wrote for the official CIFAR files: every
  str as a BINSTRING (read back as bytes under ``encoding='bytes'``), numpy.core module names."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_str8(self, obj):
    raw = obj.encode('latin-1') if isinstance(obj, str) else obj
    n = len(raw)
    self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                else pickle.BINSTRING + n.to_bytes(4, 'little')) + raw)
    self.memoize(obj)

  dispatch[bytes] = _save_str8
  dispatch[str] = _save_str8


def _dumps_py2(obj) -> bytes:
  out = io.BytesIO()
  _Py2Pickler(out, protocol=2).dump(obj)
  return out.getvalue().replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')


def test_python_layout_of_python2_and_every_protocol_loads(tmp_path, subset):
  # The official files: Python 2 protocol-2 dicts with str keys (bytes under encoding='bytes'),
  # batch_label, a numpy u8 array and lists of labels and file names.
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  py2 = {'batch_label': 'training batch 1 of 2', 'labels': subset.train_labels[:2000].tolist(),
         'data': _planes(subset.train_images[:2000]),
         'filenames': [f'img_{i}.png' for i in range(2000)]}
  (folder / 'data_batch_1').write_bytes(_dumps_py2(py2))
  assert b'numpy.core.multiarray\n_reconstruct' in (folder / 'data_batch_1').read_bytes()
  # Python 3 files: protocol 2 (bytes via _codecs.encode), protocol 5 (numpy _frombuffer), numpy
  # scalars as labels.
  (folder / 'data_batch_2').write_bytes(pickle.dumps(
      {b'data': _planes(subset.train_images[2000:]), b'labels': subset.train_labels[2000:].tolist(),
       b'batch_label': b'training batch 2 of 2'}, protocol=2))
  (folder / 'test_batch').write_bytes(pickle.dumps(
      {b'data': _planes(subset.test_images), b'labels': list(subset.test_labels)}, protocol=5))
  ds = readers.load_local('cifar10', str(folder), num_train=4000, num_test=1000)
  np.testing.assert_array_equal(ds.train_images, subset.train_images)
  np.testing.assert_array_equal(ds.train_labels, subset.train_labels)
  np.testing.assert_array_equal(ds.test_images, subset.test_images)
  np.testing.assert_array_equal(ds.test_labels, subset.test_labels)


class _Call:
  """Pickles as a call of `fn(*args)` (what a crafted data file would do)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, subset):
  marker = tmp_path / 'pwned'
  good = pickle.dumps({b'data': _planes(subset.test_images), b'labels': subset.test_labels.tolist()})
  payloads = {'posix.system': _Call(os.system, f'touch {marker}'),
              'io.open': _Call(open, str(marker), 'w'),
              'builtins.eval': _Call(eval, f'open({str(marker)!r}, "w")'),
              'builtins.exec': _Call(exec, f'open({str(marker)!r}, "w")'),
              'subprocess.Popen': _Call(subprocess.Popen, ['touch', str(marker)])}
  for i, (name, payload) in enumerate(payloads.items()):
    folder = tmp_path / str(i) / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    (folder / 'test_batch').write_bytes(good)
    for protocol in (2, 5):
      (folder / 'data_batch_1').write_bytes(pickle.dumps(
          {b'data': payload, b'labels': subset.train_labels.tolist()}, protocol=protocol))
      with pytest.raises(dataset.DatasetError) as e:
        readers.load_local('cifar10', str(folder), num_train=4000, num_test=1000)
      message = str(e.value)
      assert '\n' not in message and 'data_batch_1' in message, message
      # (protocol 2 writes Python 2 module names: __builtin__.eval)
      assert re.search(rf'refers to [\w.]+\.{name.split(".")[1]}, which no CIFAR python-version '
                       'file holds; refused', message), message
      assert not marker.exists(), name  # nothing ran


def test_cifar100_binary_and_python_layouts(tmp_path, subset):
  rng = np.random.default_rng(0)
  fine = rng.integers(0, 100, 5000).astype(np.uint8)
  coarse = (fine // 5).astype(np.uint8)
  images = np.concatenate([subset.train_images, subset.test_images])
  records = np.concatenate([coarse[:, None], fine[:, None], _planes(images)], axis=1)
  bin_dir = tmp_path / 'bin' / 'cifar-100-binary'
  bin_dir.mkdir(parents=True)
  (bin_dir / 'train.bin').write_bytes(records[:4000].tobytes())
  (bin_dir / 'test.bin').write_bytes(records[4000:].tobytes())
  _write_py_layout(tmp_path / 'py' / 'cifar-100-python', 'cifar100', {
      'train': {b'data': _planes(images[:4000]), b'fine_labels': fine[:4000].tolist(),
                b'coarse_labels': coarse[:4000].tolist()},
      'test': {b'data': _planes(images[4000:]), b'fine_labels': fine[4000:].tolist(),
               b'coarse_labels': coarse[4000:].tolist()},
  })
  for sub in ('bin', 'py'):
    ds = readers.load_local('cifar100', str(tmp_path / sub), num_train=4000, num_test=1000)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.mean, np.float32(dataset.CIFAR100_MEAN))
    np.testing.assert_array_equal(ds.train_images, subset.train_images)
    np.testing.assert_array_equal(ds.test_images, subset.test_images)
    np.testing.assert_array_equal(ds.train_labels, fine[:4000])
    np.testing.assert_array_equal(ds.test_labels, fine[4000:])
  # A CIFAR-10 file read as CIFAR-100 has the wrong record size.
  (bin_dir / 'test.bin').write_bytes(records[4000:, 1:].tobytes()[:3073 * 7])
  with pytest.raises(dataset.DatasetError, match=r'test\.bin.*3,074'):
    readers.load_local('cifar100', str(bin_dir), num_train=4000, num_test=1000)


def test_tfds_source_reads_array_record_data_source():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=6):
    ds = readers.load_dataset({'source': 'tfds', 'name': 'cifar10', 'num_train': 6, 'num_test': 6})
    ref = tfds.data_source('cifar10', split='train')
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images[3], ref[3]['image'])
    np.testing.assert_array_equal(ds.train_labels, [ref[i]['label'] for i in range(6)])
    with pytest.raises(dataset.DatasetError, match='expected 50,000 records, found 6'):
      readers.load_tfds('cifar10')
  assert 'tensorflow' not in sys.modules


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  with pytest.raises(dataset.DatasetError, match='prepare'):
    readers.load_tfds('cifar10', str(tmp_path))


def test_config_validation():
  cfg = dataset.get_config()
  assert cfg.source == 'local' and cfg.data_dir is None and dict(cfg.splits) == SIZES
  cfg.data_dir = '/x'  # The placeholder accepts a string override.
  with pytest.raises(dataset.DatasetError, match='source'):
    readers.load_dataset({'source': 'ftp'})
  with pytest.raises(dataset.DatasetError, match='cifar10'):
    readers.load_dataset({'name': 'mnist'})


def test_build_from_shared_reuses_complete_folder(cifar10_bin_dir, data_cache_dir, shared_dir):
  mtime = os.path.getmtime(os.path.join(cifar10_bin_dir, 'data_batch_1.bin'))
  assert prepare.build_cifar10_from_shared(data_cache_dir, shared_dir) == cifar10_bin_dir
  assert os.path.getmtime(os.path.join(cifar10_bin_dir, 'data_batch_1.bin')) == mtime


def test_build_subset_command_copies_the_lossless_subset(tmp_path, shared_dir, capsys):
  assert prepare.main(['build-subset', '--data_dir', str(tmp_path), '--shared', shared_dir]) == 0
  out = capsys.readouterr().out.strip()
  assert out == str(tmp_path / 'cifar10-lossless-subset' / 'cifar-10-batches-bin')
  ds = readers.load_local('cifar10', out, num_train=4000, num_test=1000)
  src = os.path.join(shared_dir, 'data', 'cifar10-lossless-subset', 'data_batch_1_first4000.bin')
  with open(src, 'rb') as f:  # the first record, byte for byte: label, then CHW pixels
    first = np.frombuffer(f.read(3073), np.uint8)
  assert ds.train_labels[0] == first[0]
  np.testing.assert_array_equal(ds.train_images[0], first[1:].reshape(3, 32, 32).transpose(1, 2, 0))


def test_build_commands_with_a_bogus_shared_folder_fail_cleanly(tmp_path, capsys):
  for command in ('build-subset', 'build-shared'):
    assert prepare.main([command, '--data_dir', str(tmp_path / 'data'),
                    '--shared', str(tmp_path / 'nope')]) == 2
    assert 'does not exist' in capsys.readouterr().err
  assert not (tmp_path / 'data').exists()  # no lock files or folders left behind


def test_check_command(cifar10_subset_dir, capsys):
  assert prepare.main(['check', '--data_dir', cifar10_subset_dir, '--num_train', '4000',
                  '--num_test', '1000']) == 0
  assert 'train (4000, 32, 32, 3)' in capsys.readouterr().out
  # Bad input names this command's flags, not the config fields of a run.
  assert prepare.main(['check', '--data_dir', cifar10_subset_dir, '--num_train', '5']) == 2
  err = capsys.readouterr().err
  assert '--num_train / --num_test' in err and '--data_dir' in err and 'config.' not in err


# ---------------------------------------------------------------------------
# Splits and shuffling.
# ---------------------------------------------------------------------------


def test_splitmix64_reference_vectors():
  # Vigna's splitmix64.c seeded with 1234567: the first three outputs.
  gamma = 0x9E3779B97F4A7C15
  states = np.array([(1234567 + k * gamma) % 2**64 for k in range(3)], np.uint64)
  np.testing.assert_array_equal(
      pipeline.splitmix64(states),
      np.array([6457827717110365317, 3203168211198807973, 9817491932198370423], np.uint64))


def test_splits_disjoint_stable_and_seeded(full, cifar10_bin_dir):
  a = pipeline.split_train(50_000, SIZES, seed=0)
  b = pipeline.split_train(50_000, SIZES, seed=0)
  c = pipeline.split_train(50_000, SIZES, seed=1)
  assert {k: len(v) for k, v in a.items()} == SIZES
  union = np.concatenate(list(a.values()))
  assert len(np.unique(union)) == len(union) == 50_000 and union.min() == 0 and union.max() == 49_999
  for k in SIZES:
    np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a[k], c[k])
  # Two independent loads give identical split contents.
  other = pipeline.make_splits(readers.load_local('cifar10', cifar10_bin_dir), SIZES, seed=0)
  mine = pipeline.make_splits(full, SIZES, seed=0)
  for k in SIZES:
    np.testing.assert_array_equal(other[k][0], mine[k][0])
    np.testing.assert_array_equal(other[k][1], mine[k][1])
  # A split depends only on the seed and the splits before it.
  np.testing.assert_array_equal(pipeline.split_train(50_000, {'warmup': 5_000}, 0)['warmup'], a['warmup'])
  with pytest.raises(dataset.DatasetError, match='do not fit'):
    pipeline.split_train(50_000, {'a': 30_000, 'b': 30_000}, seed=0)
  with pytest.raises(dataset.DatasetError, match='do not fit'):
    pipeline.split_train(50_000, {'a': -1}, seed=0)


def test_epoch_is_a_seeded_permutation():
  n, bsz = 100, 16
  images = np.zeros((n, 32, 32, 3), np.uint8)
  labels = np.arange(n)  # Labels = indices, so the batches reveal the order.
  order = lambda s, e: np.concatenate([np.asarray(b['label']) for b in epoch_batches(
      images, labels, batch_size=bsz, seed=s, epoch=e, mean=MEAN, std=STD)])
  first = order(0, 0)
  assert len(first) == 96 and len(np.unique(first)) == 96
  np.testing.assert_array_equal(first, order(0, 0))
  assert not np.array_equal(first, order(0, 1))
  assert not np.array_equal(first, order(1, 0))
  padded = list(epoch_batches(images, labels, batch_size=bsz, seed=0, epoch=0, mean=MEAN,
                                 std=STD, drop_remainder=False))
  assert len(padded) == 7 and float(sum(np.asarray(b['mask']).sum() for b in padded)) == n
  seen = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask']) > 0] for b in padded])
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))
  with pytest.raises(dataset.DatasetError, match='start_step'):
    next(epoch_batches(images, labels, batch_size=bsz, seed=0, epoch=0, mean=MEAN, std=STD,
                          start_step=7))


# ---------------------------------------------------------------------------
# Augmentation.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def small(subset):
  return subset.train_images[:200], subset.train_labels[:200]


def test_eval_batches_are_normalised_examples(small):
  images, _ = small
  idx = np.arange(len(images))
  batches = list(epoch_batches(images, idx, batch_size=50, seed=3, epoch=2, mean=MEAN, std=STD))
  for b in batches:
    src = images[np.asarray(b['label'])].astype(np.float64)
    ref = (src / 255.0 - MEAN) / STD
    np.testing.assert_allclose(np.asarray(b['image']), ref, atol=1e-5)
    assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32


def test_augmentation_deterministic_and_resumable(small):
  images, _ = small
  idx = np.arange(len(images))
  kw = dict(batch_size=40, seed=7, epoch=3, mean=MEAN, std=STD, augment=True, cutout=16)
  full_epoch = list(epoch_batches(images, idx, **kw))
  again = list(epoch_batches(images, idx, **kw))
  resumed = list(epoch_batches(images, idx, start_step=3, **kw))
  assert len(full_epoch) == 5 and len(resumed) == 2
  for x, y in zip(full_epoch, again):
    np.testing.assert_array_equal(np.asarray(x['image']), np.asarray(y['image']))
  for x, y in zip(full_epoch[3:], resumed):
    np.testing.assert_array_equal(np.asarray(x['image']), np.asarray(y['image']))
    np.testing.assert_array_equal(np.asarray(x['label']), np.asarray(y['label']))
  other_epoch = next(epoch_batches(images, idx, **{**kw, 'epoch': 4}))
  assert not np.array_equal(np.asarray(other_epoch['image']), np.asarray(full_epoch[0]['image']))
  # Batch `step` uses batch_key(seed, epoch, step) on the shuffled examples.
  step = 4
  order = pipeline.epoch_permutation(len(images), 7, 3)[step * 40:(step + 1) * 40]
  ref = pipeline.augment(pipeline.batch_key(7, 3, step), images[order], MEAN, STD, cutout=16)
  np.testing.assert_array_equal(np.asarray(full_epoch[step]['label']), order)
  np.testing.assert_allclose(np.asarray(full_epoch[step]['image']), np.asarray(ref), atol=1e-6)


def test_crop_is_a_shifted_zero_padded_window_and_flip_a_mirror(small):
  images, _ = small
  out = _denormalize(pipeline.augment(jax.random.key(0), images, MEAN, STD, cutout=0))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.float64)
  found = []
  for i in range(len(images)):
    hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
            if np.array_equal(out[i], (lambda w: w[:, ::-1] if f else w)(
                padded[i, dy:dy + 32, dx:dx + 32]))]
    assert hits, f'example {i} is not a crop of its padded image'
    found.append(hits[0])
  shifts = {(dy, dx) for dy, dx, _ in found}
  flips = {f for _, _, f in found}
  assert len(shifts) > 20 and flips == {0, 1}


def test_flip_alone_is_exact_mirror(small):
  images, _ = small
  out = np.asarray(pipeline.augment(jax.random.key(1), images, MEAN, STD, crop_padding=0, cutout=0))
  plain = np.asarray(pipeline.normalize(images, MEAN, STD))
  mirrored = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, plain)]
  same = [np.array_equal(o, p) for o, p in zip(out, plain)]
  assert all(m or s for m, s in zip(mirrored, same))
  assert 60 < sum(mirrored) < 140


def test_cutout_zeroes_a_clipped_square_after_normalisation(small):
  images, _ = small
  out = np.asarray(pipeline.augment(jax.random.key(2), images, MEAN, STD, crop_padding=0, flip=False,
                              cutout=16))
  plain = np.asarray(pipeline.normalize(images, MEAN, STD))
  sides = []
  for o, p in zip(out, plain):
    hole = np.all(o == 0.0, axis=-1)
    rows, cols = np.where(hole.any(1))[0], np.where(hole.any(0))[0]
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert hole.sum() == h * w and len(rows) == h and len(cols) == w  # One solid rectangle.
    assert 8 <= h <= 16 and 8 <= w <= 16
    np.testing.assert_array_equal(o[~hole], p[~hole])
    sides.append((h, w))
  assert (16, 16) in sides and any(s != (16, 16) for s in sides)  # Clipped at the borders.


# ---------------------------------------------------------------------------
# Data parallelism.
# ---------------------------------------------------------------------------


def test_single_device_sharding_is_a_no_op(small):
  images, labels = small
  mesh = sharding_lib.make_mesh()
  sharding = sharding_lib.batch_sharding(mesh)
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  kw = dict(batch_size=40, seed=0, epoch=0, mean=MEAN, std=STD, augment=True, cutout=16)
  a = next(epoch_batches(images, labels, sharding=sharding, **kw))
  b = next(epoch_batches(images, labels, **kw))
  assert a['image'].sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_array_equal(np.asarray(a['image']), np.asarray(b['image']))
  np.testing.assert_array_equal(np.asarray(a['label']), np.asarray(b['label']))


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from bnas_jax.data import dataset, pipeline, sharding as sharding_lib
    def epoch_batches(images, labels, *, epoch, start_step=0, **loader):
      return pipeline.Loader(images, labels, **loader).epoch(epoch, start_step)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64)
    mesh = sharding_lib.make_mesh()
    sharding = sharding_lib.batch_sharding(mesh)
    kw = dict(batch_size=16, seed=5, epoch=1, mean=dataset.CIFAR10_MEAN, std=dataset.CIFAR10_STD,
              augment=True, cutout=16)
    sharded = list(epoch_batches(images, labels, sharding=sharding, **kw))
    plain = list(epoch_batches(images, labels, **kw))
    equal = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
                for a, b in zip(sharded, plain) for k in ('image', 'label'))
    shards = [s.data.shape for s in sharded[0]['image'].addressable_shards]
    try:
      next(epoch_batches(images, labels, **{**kw, 'batch_size': 9}, sharding=sharding))
      error = ''
    except dataset.DatasetError as e:
      error = str(e)
    split = pipeline.split_train(50_000, {'warmup': 5_000}, 0)['warmup']
    print(json.dumps({'devices': jax.device_count(), 'equal': equal, 'shards': shards,
                      'error': error, 'split_head': split[:20].tolist(),
                      'tensorflow': 'tensorflow' in sys.modules}))
''')


def test_two_devices_split_the_batch_and_match_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _MULTI_DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['devices'] == 2
  assert out['equal']  # Sharding does not change the augmented values.
  assert out['shards'] == [[8, 32, 32, 3], [8, 32, 32, 3]]
  assert 'not divisible by the 2 devices' in out['error']
  # The split is identical in another process.
  assert out['split_head'] == pipeline.split_train(50_000, {'warmup': 5_000}, 0)['warmup'][:20].tolist()
  assert not out['tensorflow']


_MULTI_PROCESS_WORKER = textwrap.dedent('''
    import sys
    import jax
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                               process_id=pid)
    import numpy as np
    from bnas_jax.data import dataset, pipeline, sharding as sharding_lib
    def epoch_batches(images, labels, *, epoch, start_step=0, **loader):
      return pipeline.Loader(images, labels, **loader).epoch(epoch, start_step)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    sharding = sharding_lib.batch_sharding(sharding_lib.make_mesh())
    result = {}
    for step, b in enumerate(epoch_batches(
        images, np.arange(64), batch_size=16, seed=5, epoch=1, mean=dataset.CIFAR10_MEAN,
        std=dataset.CIFAR10_STD, augment=True, cutout=16, sharding=sharding)):
      (shard,) = b['image'].addressable_shards
      result[f'rows{step}'] = np.array([shard.index[0].start, shard.index[0].stop])
      result[f'image{step}'] = np.asarray(shard.data)
      result[f'label{step}'] = np.asarray(b['label'].addressable_shards[0].data)
    assert jax.process_count() == 2 and jax.device_count() == 2
    np.savez(out, **result)
''')


def test_two_processes_assemble_the_global_batch(tmp_path):
  """jax.distributed on CPU: each process loads only its rows; together they form the batch."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, '-c', _MULTI_PROCESS_WORKER, str(pid), str(port),
                             str(tmp_path / f'p{pid}.npz')], env=env, stderr=subprocess.PIPE,
                            text=True) for pid in (0, 1)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  single = list(epoch_batches(images, np.arange(64), batch_size=16, seed=5, epoch=1,
                                 mean=MEAN, std=STD, augment=True, cutout=16))
  parts = [np.load(tmp_path / f'p{pid}.npz') for pid in (0, 1)]
  for step, batch in enumerate(single):
    assert [list(p[f'rows{step}']) for p in parts] == [[0, 8], [8, 16]]
    np.testing.assert_array_equal(np.concatenate([p[f'label{step}'] for p in parts]),
                                  np.asarray(batch['label']))
    np.testing.assert_allclose(np.concatenate([p[f'image{step}'] for p in parts]),
                               np.asarray(batch['image']), atol=1e-6)
