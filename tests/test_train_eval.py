"""Tests of the retraining loop (bnas_jax.train_eval) and its experiment configs.

A tiny network (2 cells, C = 4, few ops, aux head) trains for a few steps on the lossless CIFAR-10
subset fixture. Oracles: closed-form schedules; exact resume (a run stopped mid-epoch and resumed
ends with exactly the test loss of an uninterrupted run); the files a run must leave behind.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import train_eval
import helpers
from bnas_jax.data import dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = helpers.TINY_DARTS_CELL


def _load_experiment(name):
  return config_files.load(os.path.join(REPO, "experiments", f"{name}.py"))


def _tiny_config(data_dir: str, genotype_path: str):
  # both cells are reductions: 32 -> 8, aux head on cell 1
  c = helpers.tiny_retrain_config(genotype_path, data_dir, epochs=2, max_steps_per_epoch=3,
                                  max_eval_examples=200)
  c.checkpoint.async_save = False
  c.log_every_steps = 1
  return c


def test_schedules_match_closed_form():
  t = train_eval.default_config().train
  lr = train_eval.learning_rate_fn(t, steps_per_epoch=10)
  for step, epoch in ((0, 0), (9, 0), (10, 1), (3005, 300), (5999, 599)):
    want = 0.5 * 0.025 * (1 + math.cos(math.pi * epoch / 600))
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)  # float32
  im = _load_experiment("imagenet_eval").get_config().train
  lr = train_eval.learning_rate_fn(im, steps_per_epoch=7)
  assert float(lr(7 * 10 + 3)) == pytest.approx(0.1 * 0.97 ** 10, rel=1e-5)
  assert train_eval.drop_prob_at(t, 300) == pytest.approx(0.1)
  assert train_eval.drop_prob_at(t, 0) == 0.0
  # Per-step cosine (proxyless recipe): the same curve evaluated at every step, to lr_min.
  ts = train_eval.default_config().train
  ts.lr_schedule, ts.lr, ts.lr_min, ts.epochs = "cosine_step", 0.1, 0.001, 6
  lr = train_eval.learning_rate_fn(ts, steps_per_epoch=10)
  for step in (0, 1, 9, 10, 31, 59, 60):
    want = 0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi * step / 60))
    assert float(lr(step)) == pytest.approx(want, rel=1e-5)
  ts.lr_schedule = "linear"
  with pytest.raises(ValueError, match="cosine_step"):
    train_eval.learning_rate_fn(ts, 10)


def test_nesterov_matches_torch_sgd_semantics():
  # torch.optim.SGD(momentum=mu, nesterov=True, weight_decay=wd), written out by hand:
  # g' = g + wd p; b = mu b + g' (b = g' at the first step); p -= lr (g' + mu b).
  t = train_eval.default_config().train
  t.lr_schedule, t.lr, t.lr_min, t.epochs, t.momentum, t.weight_decay, t.grad_clip = (
      "cosine_step", 0.1, 0.0, 1, 0.9, 1e-2, 0.0)
  t.nesterov = True
  steps = 4
  tx = train_eval.create_optimizer(t, steps_per_epoch=steps)
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=5), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(steps)]
  state, params = tx.init(p), p
  ref, buf = np.asarray(p, np.float64), None
  for k, g in enumerate(grads):
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
    lr_k = 0.5 * 0.1 * (1 + math.cos(math.pi * k / steps))
    gd = np.asarray(g, np.float64) + 1e-2 * ref
    buf = gd if buf is None else 0.9 * buf + gd
    ref = ref - lr_k * (gd + 0.9 * buf)
  np.testing.assert_allclose(params, ref, rtol=1e-5)
  t.nesterov = False  # plain momentum differs
  tx = train_eval.create_optimizer(t, steps_per_epoch=steps)
  state, plain = tx.init(p), p
  for g in grads:
    upd, state = tx.update(g, state, plain)
    plain = optax.apply_updates(plain, upd)
  assert not np.allclose(plain, ref, rtol=1e-3)


def test_experiment_configs_follow_the_protocols():
  cifar = _load_experiment("cifar_eval")
  c = cifar.get_config()
  assert (c.mode, c.train.epochs, c.train.batch_size, c.train.lr, c.train.momentum,
          c.train.weight_decay, c.train.grad_clip, c.data.cutout, c.train.drop_prob,
          c.train.aux_weight, c.model.init_channels, c.model.num_cells) == (
              "train", 600, 96, 0.025, 0.9, 3e-4, 5.0, 16, 0.2, 0.4, 36, 20)
  assert cifar.get_config("cpu").model.num_cells < 20
  im = _load_experiment("imagenet_eval").get_config()
  assert (im.train.epochs, im.train.batch_size, im.train.label_smoothing, im.train.aux_weight,
          im.model.num_cells, im.model.init_channels) == (250, 128, 0.1, 0.4, 14, 48)
  with pytest.raises(ValueError, match="variant"):
    cifar.get_config("gpu")


def test_missing_imagenet_names_how_to_provide_it(tmp_path):
  c = _load_experiment("imagenet_eval").get_config()
  c.data.data_dir = str(tmp_path / "no_imagenet_here")
  with pytest.raises(dataset.DatasetNotFoundError, match="tfds build imagenet2012"):
    train_eval.create_loaders(c)


@pytest.mark.parametrize("field,value,match", [
    ("model.dw_impl", "shfit", "config.model.dw_impl: unknown depthwise impl 'shfit'"),
    ("model.prev_reduce", "pool", "prev_reduce"),
    ("genotype", "no_such_genotype", "no_such_genotype"),
    ("train.batch_size", 0, r"config.train.batch_size=0 must be a positive multiple"),
    ("train.eval_batch_size", -1, "config.train.eval_batch_size=-1"),
])
def test_bad_model_config_is_refused_before_the_workdir_exists(tmp_path, field, value, match):
  c = train_eval.default_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(errors.ConfigError, match=match):
    train_eval.run(c, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")


def test_tiny_train_runs_checkpoints_and_resumes_exactly(cifar10_subset_dir, tmp_path, caplog):
  geno_path = str(tmp_path / "genotype.json")
  TINY.save(geno_path)
  config = _tiny_config(cifar10_subset_dir, geno_path)

  # Uninterrupted: 2 epochs x 3 steps.
  full = train_eval.run(config, str(tmp_path / "full"))
  assert full["epochs_done"] == 2 and len(full["history"]) == 2
  assert 0.0 <= full["test_error"] <= 100.0 and full["test_examples"] == 200
  assert full["aux_params"] > 0
  for name in ("config.json", "results.json", "log.txt"):
    assert os.path.exists(tmp_path / "full" / name)
  assert os.listdir(tmp_path / "full" / "tensorboard")
  with open(tmp_path / "full" / "results.json") as f:
    assert json.load(f)["test_error"] == full["test_error"]

  # SIGTERM after global step 4 (mid epoch 2): that step is checkpointed and the run stops; then
  # resumed in the same workdir.
  config.debug.signal_at_step = 4
  part = train_eval.run(config, str(tmp_path / "resumed"))
  assert part["epochs_done"] == 1 and "test_error" not in part
  assert part["stopped_by"] == "SIGTERM" and full["stopped_by"] == ""
  shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
  config.debug.signal_at_step = -1
  resumed = train_eval.run(config, str(tmp_path / "resumed"))
  assert resumed["epochs_done"] == 2
  for key in ("test_loss", "test_accuracy"):
    assert resumed[key] == full[key], key  # bit-identical training trajectory
  np.testing.assert_equal(resumed["history"][0]["test_loss"], full["history"][0]["test_loss"])

  # A damaged newest checkpoint (step 4) is skipped with one line naming it; the run resumes from
  # the one before (end of epoch 1) and ends exactly as the uninterrupted run.
  damaged = tmp_path / "damaged" / "checkpoints"
  latest = max(int(n) for n in os.listdir(damaged) if n.isdigit())
  files = glob.glob(str(damaged / str(latest) / "state" / "**" / "d" / "*"), recursive=True)
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 2)
  with caplog.at_level(logging.WARNING):
    again = train_eval.run(config, str(tmp_path / "damaged"))
  skipped = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(skipped) == 1 and skipped[0].startswith(f"checkpoint #{latest} in {damaged} ")
  for key in ("test_loss", "test_accuracy"):
    assert again[key] == full[key], key

  # A resume with another network is refused before anything is written: config.json stays.
  workdir = tmp_path / "resumed"
  stored = (workdir / "config.json").read_text()
  other = copy.deepcopy(config)
  other.model.init_channels = 2 * config.model.init_channels
  with pytest.raises(errors.ConfigError, match=r"model.init_channels differ.* nothing was changed"):
    train_eval.run(other, str(workdir))
  assert (workdir / "config.json").read_text() == stored
  # The stored config is compared by value: a re-indented config.json is not a change.
  (workdir / "config.json").write_text(json.dumps(json.loads(stored), indent=4))
  os.remove(workdir / "config.previous.json")  # from the signal_at_step change above
  config_files.write_config(config, str(workdir), train_eval.RESUME_SAFE_FIELDS)
  assert not (workdir / "config.previous.json").exists()
