"""Tests of the command line (`python -m bnas_jax.main`) and of the experiment configs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from bnas_jax import checkpointing
from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import genotype as genotype_lib
from bnas_jax import main as main_lib
from bnas_jax import search
from bnas_jax import search_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_EXPERIMENTS = ("cifar_proxy", "cifar_proxy_darts", "nb201_cifar10", "nb201_cifar100", "tiny")


def load_experiment(name: str):
  return config_files.load(os.path.join(REPO, "experiments", f"{name}.py"))


def run_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "bnas_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", SEARCH_EXPERIMENTS)
def test_search_configs_build_and_have_every_runner_field(name):
  module = load_experiment(name)
  reference = config_files.flatten(search.default_config().to_dict())
  variants = [None, "cpu"] if name != "tiny" else [None, "bayesnas", "darts"]
  for variant in variants:
    config = module.get_config(variant)
    assert config.mode == "search"
    # Same field set as the runner's defaults: nothing misspelt, nothing missing.
    assert set(config_files.flatten(config.to_dict())) == set(reference), variant
    search.check_config(config)
    split_total = sum(config.data.splits.values())
    assert split_total <= config.data.num_train
  with pytest.raises(ValueError, match="variant"):
    module.get_config("no_such_variant")


def test_proxy_config_is_the_official_protocol():
  config = load_experiment("cifar_proxy").get_config()
  assert (config.space, config.model.init_channels, config.model.num_cells) == ("bayesnas", 36, 8)
  assert (config.search.batch_size, config.search.lr, config.search.weight_decay) == (18, 0.1, 1e-4)
  assert (config.search.switch_lr, config.search.momentum) == (0.1, 0.9)
  assert dict(config.data.splits) == {"warmup": 5_000, "search": 40_000, "val": 5_000}
  assert config.bayes.lambda_origin == config.bayes.lambda_op == 0.01
  assert search_config.curvature_scale(config) == 1.0
  # Pruning, not a cap, defines the exported cell.
  assert config.genotype.max_ops == 0 and config.bayes.prune_mode == "relative"
  assert load_experiment("cifar_proxy").get_config("cpu").search.iterations == 3


def test_misspelt_override_fails_naming_the_field(tmp_path):
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={tmp_path}",
                 "--config.serch.lr=0.5", timeout=300)
  assert proc.returncode != 0
  assert "serch" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))  # failed before running


def test_bad_config_value_is_one_line_on_stderr(tmp_path):
  workdir = tmp_path / "never"
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.bayes.prune_mode=relatve")
  assert proc.returncode == 2
  # Checked before anything is logged: the error is the only line.
  assert proc.stderr.strip().splitlines() == [
      "bnas_jax.main: error: config.bayes.prune_mode='relatve'; use one of ('absolute', "
      "'relative')"], proc.stderr[-3000:]
  assert not workdir.exists()
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.search.batch_size=0")
  assert proc.returncode == 2 and not workdir.exists()
  assert proc.stderr.strip().splitlines() == [
      "bnas_jax.main: error: config.search.batch_size=0 must be a positive multiple of the 1 "
      "device(s)"], proc.stderr[-3000:]
  proc = run_cli(f"--workdir={tmp_path / 'empty'}")  # no --config and no stored config
  assert proc.returncode == 2 and "pass --config" in proc.stderr
  assert "Traceback" not in proc.stderr
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  for workdir in (afile, afile / "sub"):  # a file, or a folder under one
    proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"bnas_jax.main: error: --workdir={workdir}: {afile} is a file, not a folder; pass the "
        "path of a folder (created if missing)"], proc.stderr[-3000:]
  assert afile.read_text() == "not a folder"


def test_stored_config_of_an_older_version_gets_new_defaults(tmp_path):
  config = load_experiment("tiny").get_config()
  old = json.loads(config.to_json_best_effort())
  del old["genotype"], old["model"]["dw_impl"]  # fields added after such a run started
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = main_lib.load_config_from_workdir(str(tmp_path))
  assert loaded.genotype.max_ops == 0 and loaded.model.dw_impl == "auto"
  assert loaded.space == config.space and loaded.data.splits.search == 8
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # resuming with the new fields is allowed
  config_files.write_config(config, str(tmp_path), search_config.RESUME_SAFE_FIELDS)
  assert json.loads((tmp_path / "config.json").read_text())["genotype"]["max_ops"] == 0


def test_get_runner_dispatch():
  assert main_lib.get_runner("search") is search.run
  from bnas_jax import train_eval  # pylint: disable=g-import-not-at-top
  assert main_lib.get_runner("train") is train_eval.run
  with pytest.raises(ValueError, match="config.mode='serch'"):
    main_lib.get_runner("serch")


def test_workdir_without_config_needs_a_stored_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="--config"):
    main_lib.load_config_from_workdir(str(tmp_path))


def test_hand_edited_stored_config_is_refused_naming_the_field(tmp_path):
  config = config_files.load("experiments/tiny.py").get_config()
  stored = json.loads(config.to_json_best_effort())
  bad_type = json.loads(json.dumps(stored))
  bad_type["model"]["remat"] = "yes"
  extra = json.loads(json.dumps(stored))
  extra["model"]["no_such"] = 1
  for i, (tree, pattern) in enumerate(((bad_type, "remat"), (extra, "model.no_such"))):
    workdir = tmp_path / str(i)
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(tree))
    with pytest.raises(errors.ConfigError, match=pattern):
      main_lib.load_config_from_workdir(str(workdir))
  (tmp_path / "ok").mkdir()
  (tmp_path / "ok" / "config.json").write_text(json.dumps(stored))
  assert main_lib.load_config_from_workdir(str(tmp_path / "ok")).model.remat is True


def test_cli_unknown_config_field_is_one_line_with_exit_code_2(tmp_path):
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={tmp_path / 'run'}",
                 "--config.search.iterations=1", "--config.model.edge_lop=scan")
  assert proc.returncode == 2, proc.stderr[-3000:]
  # Only the bad override is named, with the full dotted name of the suggestion.
  assert ("bnas_jax.main: error: unknown config field in --config.model.edge_lop=scan "
          "(did you mean 'model.edge_loop'?)" in proc.stderr), proc.stderr[-3000:]
  assert "iterations" not in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()
  # A value absl cannot parse is one line with the same exit status.
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={tmp_path / 'run'}",
                 "--config.model.remat=yes")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("bnas_jax.main: error: flag --config.model.remat=yes: ('Non-boolean argument to "
          "boolean flag', 'yes')" in proc.stderr), proc.stderr[-3000:]
  assert "FATAL" not in proc.stderr and not (tmp_path / "run").exists()
  # A misspelt section is fixed in place; a missing config file and a config file's own error
  # (an unknown variant) are one line naming the file, not ml_collections' tracebacks.
  for args, line in (
      (["--config=experiments/tiny.py", "--config.serch.lr=1"],
       "unknown config field in --config.serch.lr=1 (did you mean 'search.lr'?)"),
      (["--config=experiments/tnyi.py"], "bnas_jax.main: error: --config=experiments/tnyi.py: "
       "[Errno 2] No such file or directory: 'experiments/tnyi.py'"),
      (["--config=experiments/tiny.py:nb210"], "Error whilst parsing config file: ValueError: "
       "unknown variant 'nb210' of experiments/tiny.py; use ")):
    proc = run_cli(*args, f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2 and line in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_cli_divergence_is_one_line_with_exit_code_1(tmp_path, cifar10_subset_dir):
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.data_dir={cifar10_subset_dir}", "--config.debug.nan_at_step=1",
                 "--config.search.iterations=1")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "bnas_jax.main: error: non-finite loss or gradient in optimiser step 1" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_cli_run_then_resume_from_workdir_alone(tmp_path, cifar10_subset_dir):
  # T = 0 and no warm-up: the run only initialises, saves and derives the all-alive genotype, which
  # exercises the whole CLI path (config file + overrides, run directory, checkpoint) cheaply. The
  # darts space also checks the DARTS-style export (top-2 edges per node, one op each).
  workdir = str(tmp_path / "run")
  proc = run_cli("--config=experiments/tiny.py:darts", f"--workdir={workdir}",
                 f"--config.data.data_dir={cifar10_subset_dir}",
                 "--config.search.warmup_epochs=0", "--config.search.iterations=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "local devices" in proc.stderr
  assert "config.search.iterations=0: no prior update runs" in proc.stderr  # said, not silent
  for name in ("config.json", "config.yaml", "seeds.json", "genotype.json", "genotype.png",
               "genotype.svg", "summary.json", "log.txt", "genotype_darts.json",
               "genotype_darts.txt", "genotype_darts.png", "genotype_darts.svg"):
    assert os.path.exists(os.path.join(workdir, name)), name
  darts_cell = genotype_lib.Genotype.load(os.path.join(workdir, "genotype_darts.json"))
  assert darts_cell.space == "darts"
  for cell_type in ("normal", "reduce"):  # DARTS format: 2 (op, input) pairs per node
    assert len(darts_cell.cell(cell_type)) == 8
  with open(os.path.join(workdir, "genotype_darts.txt")) as f:
    assert f.read().startswith("Genotype(normal=[(")
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  stored = main_lib.load_config_from_workdir(workdir)
  assert stored.space == "darts" and stored.search.iterations == 0
  assert stored.data.data_dir == cifar10_subset_dir
  with pytest.raises(AttributeError):  # read back locked, like the command-line config
    stored.no_such_field = 1
  with open(os.path.join(workdir, "genotype.json")) as f:
    first = json.load(f)
  os.remove(os.path.join(workdir, "genotype.json"))

  # Resume with --workdir only: the stored config is used and the finished run is recognised.
  proc = run_cli(f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed checkpoint" in proc.stderr
  assert "starting a new search" not in proc.stderr
  with open(os.path.join(workdir, "genotype.json")) as f:
    assert json.load(f) == first
  assert isinstance(stored, ml_collections.ConfigDict)


def test_cli_stopped_by_sigterm_checkpoints_and_exits_143(tmp_path, cifar10_subset_dir):
  workdir = str(tmp_path / "run")
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 f"--config.data.data_dir={cifar10_subset_dir}", "--config.debug.signal_at_step=1")
  assert proc.returncode == 128 + 15, proc.stderr[-3000:]
  assert "SIGTERM received" in proc.stderr and "rerun with the same --workdir" in proc.stderr
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.restore_meta()["position"]["global_step"] == 1
  ckpt.close()


def test_config_files_load_names_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
    config_files.load_sibling(str(tmp_path / "x.py"), "nope")


@pytest.mark.parametrize("experiment", ["tiny.py", "cifar_eval.py"])
def test_one_seed_sets_the_data_seed_unless_it_is_overridden(experiment, tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def parse(*overrides):
    argv = ["prog", f"--config={os.path.join(REPO, 'experiments', experiment)}", *overrides]
    fv = flags.FlagValues()  # overrides are registered from the argv given at definition
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config

  config = parse("--config.seed=3")
  assert (config.seed, config.data.seed) == (3, 3)
  config = parse("--config.seed=3", "--config.data.seed=5")
  assert (config.seed, config.data.seed) == (3, 5)
  # The stored config holds both values and reads back the same, however they were set.
  workdir = tmp_path / experiment
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  loaded = main_lib.load_config_from_workdir(str(workdir))
  assert (loaded.seed, loaded.data.seed) == (3, 5)
  assert json.loads(loaded.to_json_best_effort()) == json.loads(config.to_json_best_effort())


@pytest.mark.parametrize("experiment,variant", [
    ("proxyless_cifar10", "tiny"), ("proxyless_eval", "tiny"), ("compress_lenet5", "tiny"),
    ("cifar_proxy", "cpu"), ("cifar_eval", "tiny"), ("nb201_cifar10", "cpu")])
def test_every_experiment_resumes_from_its_stored_config_alone(tmp_path, experiment, variant):
  """`--workdir DIR` alone reads config.json back over the runner's defaults: every field an
  experiment sets must be a field the runner knows."""
  config = load_experiment(experiment).get_config(variant)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  loaded = main_lib.load_config_from_workdir(str(tmp_path))
  assert json.loads(loaded.to_json_best_effort()) == json.loads(config.to_json_best_effort())
