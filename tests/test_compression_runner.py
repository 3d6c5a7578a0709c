"""The compression runner: an end-to-end tiny run, exact resume after a simulated kill, baselines in
the same harness, and config errors named before anything is created.

Oracles: an uninterrupted run of the same config (resume equality, bit for bit), the widths the
export writes (counts from `networks.count`), and the kept structure a baseline was asked for.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax.compression import compress_config
from bnas_jax.compression import export
from bnas_jax.compression import networks
from bnas_jax.compression import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(REPO, "experiments", "compress_lenet5.py")


def tiny_config(shared_dir, **overrides):
  c = config_files.load(EXP).get_config("tiny")
  c.data.data_dir = os.path.join(shared_dir, "data", "mnist-t10k")
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _final(workdir):
  with open(os.path.join(workdir, runner.RESULT_JSON)) as f:
    result = json.load(f)
  _, variables = export.load(os.path.join(workdir, "final"))
  return result, variables


@pytest.fixture(scope="module")
def reference(shared_dir, tmp_path_factory):
  """An uninterrupted tiny BayesNAS run (lambda large enough to prune, small enough that the
  posterior rule leaves every layer alive)."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  c = tiny_config(shared_dir, **{"compress.lam": 0.003, "checkpoint.every_steps": 4})
  runner.run(c, workdir)
  return c, workdir


def test_tiny_run_prunes_and_exports_consistent_counts(reference):
  _, workdir = reference
  result, variables = _final(workdir)
  arch, _ = export.load(os.path.join(workdir, "final"))
  counts = networks.count(arch)
  assert result["weights_kept"] == counts["weights"] == networks.count_tree(variables)["weights"]
  assert result["kept_structure"] == networks.structure(arch)
  assert result["weights_dense"] == 430_500 and result["macs_dense"] == 2_293_000
  assert result["weights_kept"] < result["weights_dense"]  # something was pruned
  assert 0.0 <= result["test_err"] <= 100.0
  stages = [h["stage"] for h in result["history"]]
  assert stages == ["pretrain", "compress", "compress", "finetune"]
  assert os.path.exists(os.path.join(workdir, "pretrained", export.STRUCTURE_JSON))


# Mid pretraining (checkpoint at step 4), mid compress iteration 2, mid fine-tuning.
@pytest.mark.parametrize("stop_after", [5, 14, 22])
def test_resume_after_kill_gives_the_same_result(reference, tmp_path, stop_after):
  c, ref_dir = reference
  c = c.copy_and_resolve_references()
  workdir = str(tmp_path)
  c.debug.stop_after_steps = stop_after
  out = runner.run(c, workdir)
  assert out.result is None and not os.path.exists(os.path.join(workdir, runner.RESULT_JSON))
  c.debug.stop_after_steps = -1
  runner.run(c, workdir)
  got, got_v = _final(workdir)
  want, want_v = _final(ref_dir)
  assert got["kept_structure"] == want["kept_structure"]
  assert got["test_err"] == want["test_err"] and got["val_err"] == want["val_err"]
  for a, b in zip(*(jax_leaves(v) for v in (got_v, want_v))):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)


def test_l1_baseline_from_the_same_pretrained_network(reference, tmp_path):
  c, ref_dir = reference
  c = c.copy_and_resolve_references()
  c.method = "l1_filter"
  c.baseline.ratio = 0.5
  c.pretrained_dir = os.path.join(ref_dir, "pretrained")
  c.checkpoint.every_steps = -1
  runner.run(c, str(tmp_path))
  result, _ = _final(str(tmp_path))
  # Half of each layer by L1 norm; of the 400 best fc1 inputs, those of a removed conv2 channel
  # go too (their input slice is gone, spec 2.3).
  _, pre = export.load(c.pretrained_dir)
  k2 = np.abs(np.asarray(pre["params"]["conv2"]["kernel"])).sum(axis=(0, 1, 2))
  kept_c = set(np.argsort(-k2, kind="stable")[:25].tolist())
  rows = np.abs(np.asarray(pre["params"]["fc1"]["kernel"])).sum(axis=1)
  kept_rows = [r for r in np.argsort(-rows, kind="stable")[:400] if r % 50 in kept_c]
  assert result["kept_structure"] == f"10-25-{len(kept_rows)}-250"
  assert [h["stage"] for h in result["history"]] == ["finetune"] * 3  # T * E_in + F epochs


def test_config_errors_are_named_before_the_workdir_exists(shared_dir, tmp_path):
  workdir = str(tmp_path / "never")
  for field, value, match in (("method", "prune", "config.method"),
                              ("compress.lam", 0.0, "compress.lam"),
                              ("baseline.ratio", 1.0, "baseline.ratio"),
                              ("model.name", "lenet6", "config.model")):
    c = tiny_config(shared_dir, **{field: value})
    with pytest.raises(errors.ConfigError, match=match):
      runner.run(c, workdir)
  c = tiny_config(shared_dir, method="random")
  c.baseline.kept = "5-10-76"
  with pytest.raises(errors.ConfigError, match="4 dash-separated counts"):
    runner.run(c, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("variant", ["full", "bench", "cpu"])
def test_vgg_like_variants_load_and_validate(variant):
  """The VGG-like experiment's variants pass the config checks (no data, no training); `bench`
  (benchmark (b)) is the width-1/8 network on CIFAR-10 with a validation split and the bench
  schedule, `full` is still the published protocol's lengths at width 1."""
  c = config_files.load(os.path.join(REPO, "experiments", "compress_vgg_like.py")).get_config(
      variant)
  runner.check_config(c)
  assert c.mode == "compress" and c.model.name == "vgg_like"
  assert c.data.source == "cifar_local" and c.data.name == "cifar10" and c.data.num_val == 5_000
  counts = networks.count(runner.make_arch(c))
  if variant == "full":
    assert counts["params"] == 14_991_946 and counts["macs"] == 313_463_808
    assert (c.pretrain.epochs, c.compress.iterations, c.finetune.epochs) == (200, 60, 20)
  else:
    assert c.model.scale == 0.125 and counts["params"] == 236_562
  if variant == "bench":
    assert (c.pretrain.epochs, c.compress.iterations, c.finetune.epochs) == (7, 2, 1)
    assert c.compress.lambda_ramp == 1.0 and c.compress.curvature_batches == 10
    assert not compress_config.step_config(c, "pretrain").dropout  # too strong at width 1/8
  else:
    assert compress_config.step_config(c, "pretrain").dropout  # SBP's pretraining dropout
  # Every method of the benchmark passes the checks with this variant.
  for method in ("dense", "bayesnas", "group_lasso", "l1_filter"):
    c.method = method
    runner.check_config(c)


def test_vgg_like_unknown_variant_is_named():
  with pytest.raises(ValueError, match="use full, bench or cpu"):
    config_files.load(os.path.join(REPO, "experiments", "compress_vgg_like.py")).get_config("gpu")
