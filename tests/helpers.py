"""Helpers shared by the test modules (imported as ``helpers``; pytest puts tests/ on sys.path).

* `tiny_search_config`: ``experiments/tiny.py`` pointed at a data folder, with dotted overrides;
* `TINY_DARTS_CELL`: a small darts genotype for retraining tests;
* `tiny_retrain_config`: the retraining config of a 2-cell, C = 4 network of that cell on the
  lossless subset, a few steps per epoch;
* `two_device_search`: a search on 2 simulated CPU devices in a subprocess (a fixture's body);
* `jit_init`: a flax module's ``init`` as one compiled program.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from typing import Any, Iterator, Mapping

import jax

from bnas_jax import config_files
from bnas_jax import genotype as genotype_lib
from bnas_jax import train_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")

TINY_DARTS_CELL = genotype_lib.Genotype(
    space="darts",
    normal=((2, 0, "sep_conv_3x3"), (2, 1, "skip_connect"), (3, 1, "max_pool_3x3"),
            (3, 2, "skip_connect"), (4, 1, "avg_pool_3x3"), (4, 3, "skip_connect"),
            (5, 1, "skip_connect"), (5, 4, "max_pool_3x3")),
    reduce=((2, 0, "max_pool_3x3"), (2, 1, "sep_conv_3x3"), (3, 1, "max_pool_3x3"),
            (3, 2, "skip_connect"), (4, 2, "skip_connect"), (4, 3, "avg_pool_3x3"),
            (5, 2, "skip_connect"), (5, 4, "skip_connect")),
    normal_concat=(2, 3, 4, 5), reduce_concat=(2, 3, 4, 5))


def jit_init(module, *args, **kwargs):
  """``module.init(*args, **kwargs)`` compiled as one program. Called eagerly, flax's init runs
  every parameter initialiser op by op, each a program of its own: tens of seconds for a
  PyramidNet or a reduction cell, every time a test process starts. `kwargs` are static."""
  return jax.jit(functools.partial(module.init, **kwargs))(*args)


def set_dotted(config, overrides: Mapping[str, Any]):
  """Sets ``{'a.b': value}`` fields of `config` in place and returns it."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_search_config(data_dir: str, overrides: Mapping[str, Any] | None = None, *,
                       lock: bool = True):
  """The experiments/tiny.py config (nb201 space) on `data_dir`, with dotted `overrides`."""
  config = config_files.load(TINY).get_config()
  config.data.data_dir = data_dir
  set_dotted(config, overrides or {})
  if lock:
    config.lock()
  return config


def tiny_retrain_config(genotype_path: str, data_dir: str, **train):
  """Retraining config: `TINY_DARTS_CELL`-sized net (2 cells, C = 4) on the lossless subset.

  `train` overrides fields of ``config.train`` (epochs, max_steps_per_epoch, ...).
  """
  c = train_eval.default_config()
  c.genotype = genotype_path
  c.model.init_channels = 4
  c.model.num_cells = 2
  c.data.data_dir = data_dir
  c.data.num_train = 4000
  c.data.num_test = 1000
  c.train.batch_size = 8
  c.train.eval_batch_size = 100
  for k, v in train.items():
    c.train[k] = v
  c.progress_bar = False
  return c


@contextlib.contextmanager
def two_device_search(config_arg: str, workdir: str, data_dir: str, cache_dir: str,
                      overrides: Mapping[str, Any]) -> Iterator[subprocess.Popen]:
  """Starts ``python -m bnas_jax.main --config CONFIG_ARG`` on 2 simulated CPU devices in a
  subprocess (log in ``<workdir>/stdout.txt``), yields the process and kills it on exit if it is
  still running. Compiles with the shared persistent cache in `cache_dir`."""
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(cache_dir, "jax_compilation_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  cmd = [sys.executable, "-m", "bnas_jax.main", f"--config={config_arg}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  with open(os.path.join(workdir, "stdout.txt"), "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      yield proc
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
