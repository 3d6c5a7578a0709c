"""Shared pytest fixtures and JAX settings for the bnas_jax tests.

Real data (session fixtures, built once per machine into a cache OUTSIDE the repository and
outside shared/: ``$BNAS_DATA_CACHE``, else ``$BNAS_DATA_DIR``, default ``~/.cache/bnas_jax``):

* ``cifar10_bin_dir``: the full CIFAR-10 binary layout (``cifar-10-batches-bin``: 50,000 train /
  10,000 test, JPEG-derived pixels, exact labels), built from
  ``shared/data/cifar10-jpeg-q75-derived/make_cifar10_bin.py`` under a file lock (safe with
  pytest-xdist workers) and reused when complete.
* ``cifar10_subset_dir``: the lossless 4,000 / 1,000 subset
  (``shared/data/cifar10-lossless-subset``) as ``<cache>/cifar10-lossless-subset/
  cifar-10-batches-bin`` with ``data_batch_1.bin`` (4,000 records) and ``test_batch.bin`` (1,000),
  checked against the subset's SHA256SUMS. Load it with
  ``load_local('cifar10', cifar10_subset_dir, num_train=4000, num_test=1000)``.

shared/ is found as ``$BNAS_SHARED``, else ``<repo>/shared``, else ``<repo>/../shared`` (CI runs a
fresh clone with shared/ beside it).

JAX: float32 (``jax_enable_x64`` off), a persistent compilation cache under the data cache, and
``jax_disable_most_optimizations`` on, also in the subprocesses the tests start (they inherit
``JAX_DISABLE_MOST_OPTIMIZATIONS``): the suite is bound by compiling hundreds of tiny programs, whose
XLA/LLVM optimisation costs more time than it saves. Numerics are unchanged up to float rounding.
``BNAS_TEST_FULL_OPT=1`` runs the whole suite, subprocesses included, with XLA's full optimisation,
as users' runs compile.
"""

from __future__ import annotations

import os

import jax
import pytest

from bnas_jax.data import dataset
from bnas_jax.data import prepare


def _cache_dir() -> str:
  path = os.path.expanduser(os.environ.get('BNAS_DATA_CACHE') or os.environ.get('BNAS_DATA_DIR')
                            or dataset.DEFAULT_CACHE)
  os.makedirs(path, exist_ok=True)
  return path


def pytest_configure(config):  # pylint: disable=unused-argument
  jax.config.update('jax_enable_x64', False)
  jax.config.update('jax_compilation_cache_dir', os.path.join(_cache_dir(), 'jax_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  if os.environ.get('BNAS_TEST_FULL_OPT') != '1':
    jax.config.update('jax_disable_most_optimizations', True)
    os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'  # read by subprocesses' JAX at import
  else:
    os.environ.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)


@pytest.fixture(scope='session')
def data_cache_dir() -> str:
  """The per-machine data cache (``$BNAS_DATA_CACHE``, ``$BNAS_DATA_DIR`` or ``~/.cache/bnas_jax``)."""
  return _cache_dir()


@pytest.fixture(scope='session')
def shared_dir() -> str:
  """The project's read-only shared/ folder."""
  return prepare.find_shared_dir()


@pytest.fixture(scope='session')
def cifar10_bin_dir(data_cache_dir, shared_dir) -> str:
  """Path of a complete ``cifar-10-batches-bin`` folder (JPEG-derived CIFAR-10)."""
  return prepare.build_cifar10_from_shared(data_cache_dir, shared_dir)


@pytest.fixture(scope='session')
def cifar10_subset_dir(data_cache_dir, shared_dir) -> str:
  """Path of the lossless 4,000/1,000 CIFAR-10 subset in the binary layout."""
  return prepare.build_cifar10_subset_from_shared(data_cache_dir, shared_dir)


@pytest.fixture
def full_xla_optimisation():
  """Turns ``jax_disable_most_optimizations`` off for one test (the settings users' runs compile
  with) and restores the suite's setting afterwards."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
