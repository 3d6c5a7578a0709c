"""The proxyless search through the cell-search runner (`bnas_jax.search`) on a tiny config.

``experiments/proxyless_cifar10.py:tiny``: the ``tree_tiny`` space (1 root edge, 3 searched edges)
in a 3-block PyramidNet of width 8 on 8 + 8 + 8 lossless CIFAR-10 images, batch 4, 1 warm-up epoch
+ 2 outer iterations. As in tests/test_search.py, one uninterrupted run is the reference; a run
killed twice and resumed, and the same search on 2 simulated CPU devices (a subprocess started
first so that it compiles while the reference runs), must give its result.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bnas_jax import config_files
from bnas_jax import search
from bnas_jax.search_space import tree
import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "proxyless_cifar10.py")
TWO_DEVICE_OVERRIDES = {"search.warmup_epochs": 0, "search.iterations": 1}


def tiny_config(data_dir: str, **overrides):
  config = config_files.load(CONFIG).get_config("tiny")
  config.data.data_dir = data_dir
  helpers.set_dotted(config, overrides)
  config.lock()
  return config


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory, cifar10_subset_dir, data_cache_dir):
  workdir = str(tmp_path_factory.mktemp("two_devices"))
  with helpers.two_device_search(f"{CONFIG}:tiny", workdir, cifar10_subset_dir, data_cache_dir,
                                 TWO_DEVICE_OVERRIDES) as proc:
    yield proc, workdir


@pytest.fixture(scope="module")
def reference_run(two_device_run, tmp_path_factory, cifar10_subset_dir):
  del two_device_run
  workdir = str(tmp_path_factory.mktemp("reference"))
  return search.run(tiny_config(cifar10_subset_dir), workdir), workdir


def assert_same_result(a, b, exact=True):
  assert a.genotype == b.genotype
  for t in a.gamma:
    np.testing.assert_array_equal(a.alive[t], b.alive[t])
    if exact:
      np.testing.assert_array_equal(a.gamma[t], b.gamma[t])
    else:
      np.testing.assert_allclose(a.gamma[t], b.gamma[t], rtol=1e-3, atol=1e-6)


def test_tiny_search_writes_a_valid_tree_cell_and_its_picture(reference_run):
  result, workdir = reference_run
  assert result.completed and result.global_step == 6 and len(result.history) == 2
  cell = result.genotype
  assert isinstance(cell, tree.TreeCell) and cell.space == "tree_tiny"
  tree.check_valid(cell, tree.TreeTemplate((1, 1, 2)))
  assert tree.TreeCell.load(os.path.join(workdir, "genotype.json")) == cell
  for ext in ("png", "svg"):
    assert os.path.getsize(os.path.join(workdir, f"genotype.{ext}")) > 0
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["genotype"]["kind"] == "tree_cell"
  assert result.gamma["tree"].shape == (3, 8)


def test_resume_after_kill_equals_uninterrupted(reference_run, tmp_path, cifar10_subset_dir):
  result, _ = reference_run
  workdir = str(tmp_path)
  first = search.run(tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 3}), workdir)
  assert not first.completed and first.global_step == 3
  second = search.run(tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 5}), workdir)
  assert not second.completed and second.global_step == 5 and len(second.history) == 1
  final = search.run(tiny_config(cifar10_subset_dir), workdir)
  assert final.completed and final.global_step == 6
  assert_same_result(result, final)
  assert [h["val_accuracy"] for h in final.history] == [h["val_accuracy"] for h in result.history]


def test_two_devices_equal_one_device(reference_run, two_device_run, tmp_path,
                                     cifar10_subset_dir):
  del reference_run
  one = search.run(tiny_config(cifar10_subset_dir, **TWO_DEVICE_OVERRIDES), str(tmp_path))
  proc, workdir = two_device_run
  rc = proc.wait(timeout=1500)
  with open(os.path.join(workdir, "stdout.txt")) as f:
    log = f.read()
  assert rc == 0, log[-3000:]
  assert "global devices: 2" in log
  assert tree.TreeCell.load(os.path.join(workdir, "genotype.json")) == one.genotype
  prior = np.load(os.path.join(workdir, "prior.npz"))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["global_step"] == one.global_step == 2
  np.testing.assert_array_equal(prior["alive/tree"], one.alive["tree"])
  np.testing.assert_allclose(prior["gamma/tree"].mean(0), one.gamma["tree"], rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(summary["val_accuracy"], one.val_accuracy, atol=1e-6)


def test_found_cell_retrains_in_the_pyramidnet_through_the_retraining_runner(reference_run,
                                                                           tmp_path,
                                                                           cifar10_subset_dir):
  """experiments/proxyless_eval.py:tiny on the reference run's genotype.json: a few SGD steps with
  DropPath, the test error written, the parameter count that of `pyramidnet.count_params`."""
  from bnas_jax import train_eval  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import pyramidnet  # pylint: disable=g-import-not-at-top
  _, search_dir = reference_run
  config = config_files.load(os.path.join(REPO, "experiments", "proxyless_eval.py")).get_config(
      "tiny")
  config.genotype = os.path.join(search_dir, "genotype.json")
  config.data.data_dir = cifar10_subset_dir
  config.train.max_steps_per_epoch = 2
  config.train.max_eval_examples = 250
  out = train_eval.run(config, str(tmp_path))
  model = pyramidnet.create_pyramidnet(config.genotype, 1, 0.0, 2, 10)
  assert out["params"] == pyramidnet.count_params(model)
  assert out["epochs_done"] == 2 and 0.0 <= out["test_error"] <= 100.0
  with open(os.path.join(str(tmp_path), "results.json")) as f:
    assert json.load(f)["params"] == out["params"]
