"""Tests of `bnas_jax.evaluate`: loading a retraining run's network outside the trainer.

A tiny retraining run (2 cells, C = 4, 2 epochs of 3 steps on the lossless CIFAR-10 subset) is
loaded back with `evaluate.load`; oracles: the eval-mode logits of a fixed test batch are
bit-identical in a fresh process, the command line prints the test accuracy the trainer wrote to
results.json, and a chosen step loads that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from bnas_jax import errors
from bnas_jax import evaluate
from bnas_jax import train_eval
import helpers
from bnas_jax.data import pipeline
from bnas_jax.data import readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENOTYPE = helpers.TINY_DARTS_CELL


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar10_subset_dir):
  """A finished tiny retraining run: (workdir, results dict)."""
  root = tmp_path_factory.mktemp("evaluate")
  geno_path = str(root / "genotype.json")
  GENOTYPE.save(geno_path)
  c = helpers.tiny_retrain_config(geno_path, cifar10_subset_dir, epochs=2, max_steps_per_epoch=3,
                                  max_eval_examples=200)
  c.checkpoint.async_save = False
  c.checkpoint.max_to_keep = 5
  c.log_every_steps = 1
  c.progress_bar = False
  workdir = str(root / "run")
  return workdir, train_eval.run(c, workdir)


def test_retraining_logs_each_compilation_before_it_starts(tmp_path, cifar10_subset_dir, caplog):
  caplog.set_level(logging.INFO)
  geno_path = str(tmp_path / "genotype.json")
  GENOTYPE.save(geno_path)
  c = helpers.tiny_retrain_config(geno_path, cifar10_subset_dir, epochs=1, max_steps_per_epoch=1,
                                  max_eval_examples=100)
  train_eval.run(c, str(tmp_path / "run"))
  log = [r.getMessage() for r in caplog.records if r.name == "absl"]
  for what in ("state initialisation", "train step", "eval step"):
    before = [i for i, m in enumerate(log)
              if m.startswith(f"compiling the {what} (genotype {geno_path}) (")]
    after = [i for i, m in enumerate(log)
             if m.startswith(f"compiled the {what} (genotype {geno_path}) in ")]
    assert len(before) == len(after) == 1 and before[0] < after[0], (what, log)


def _test_batch(data_dir: str) -> np.ndarray:
  ds = readers.load_local("cifar10", data_dir, num_train=4000, num_test=1000)
  return np.asarray(pipeline.normalize(ds.test_images[:16], ds.mean, ds.std))


def _run(args, **kw):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"), **kw)


def test_load_gives_identical_logits_in_a_fresh_process(trained, cifar10_subset_dir, tmp_path):
  workdir, results = trained
  net = evaluate.load(workdir)
  assert (net.epoch, net.global_step) == (2, 6)
  images = _test_batch(cifar10_subset_dir)
  logits = np.asarray(net.logits(images))
  assert logits.shape == (16, 10) and np.all(np.isfinite(logits))
  # The trainer's own evaluation of the final state: the same test accuracy.
  m = evaluate.metrics_on_test_set(net, max_examples=200)
  assert m["test_accuracy"] == results["test_accuracy"]
  assert m["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)

  np.save(tmp_path / "images.npy", images)
  out = tmp_path / "logits.npy"
  code = ("import sys, numpy as np; from bnas_jax import evaluate; "
          "net = evaluate.load(sys.argv[1]); "
          "np.save(sys.argv[3], np.asarray(net.logits(np.load(sys.argv[2]))))")
  proc = _run(["-c", code, workdir, str(tmp_path / "images.npy"), str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_array_equal(np.load(out), logits)


def test_command_prints_the_test_accuracy_of_the_run(trained):
  workdir, results = trained
  proc = _run(["-m", "bnas_jax.evaluate", "--workdir", workdir, "--max_examples", "200"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"test accuracy {results['test_accuracy']:.4f} " in proc.stdout
  assert "(epoch 2, step 6)" in proc.stdout and "on 200 test examples" in proc.stdout


def test_a_chosen_step_loads_that_checkpoint(trained, cifar10_subset_dir):
  workdir, _ = trained
  first, last = evaluate.load(workdir, step=3), evaluate.load(workdir)
  assert (first.epoch, first.global_step) == (1, 3) and first.checkpoint < last.checkpoint
  images = _test_batch(cifar10_subset_dir)
  assert not np.array_equal(np.asarray(first.logits(images)), np.asarray(last.logits(images)))
  with pytest.raises(errors.ConfigError, match=r"at step 4; the kept ones are at steps 3, 6"):
    evaluate.load(workdir, step=4)


def test_errors_name_the_problem(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    evaluate.load(str(tmp_path))
  search_dir = tmp_path / "search"
  search_dir.mkdir()
  (search_dir / "config.json").write_text(json.dumps({"mode": "search"}))
  with pytest.raises(errors.ConfigError, match="not a retraining run; train its genotype first"):
    evaluate.load(str(search_dir))
  proc = _run(["-m", "bnas_jax.evaluate", "--workdir", str(search_dir)])
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("bnas_jax.evaluate: error: ")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_tiny_retraining_variant_is_a_valid_config():
  from bnas_jax import config_files  # pylint: disable=g-import-not-at-top
  c = config_files.load(os.path.join(REPO, "experiments", "cifar_eval.py")).get_config("tiny")
  train_eval.check_config(c)
  assert (c.data.num_train, c.data.num_test, c.train.epochs) == (4000, 1000, 2)
