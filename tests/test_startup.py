"""Start-up validation: every path a config names is opened before the workdir is created.

A missing or unreadable data folder, data file, NAS-Bench-201 table or genotype file is one line
naming the config field and the fix (exit status 2 on the command line), raised before the workdir
exists or anything is compiled. Nothing here trains: each check fails (or passes) in seconds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from bnas_jax import errors
from bnas_jax import nb201
from bnas_jax import search
from bnas_jax import search_config
import helpers
from bnas_jax import train_eval
from bnas_jax.data import dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")


def tiny_config(data_dir: str, **overrides):
  """experiments/tiny.py (nb201 space) on `data_dir`, with dotted overrides (unlocked)."""
  return helpers.tiny_search_config(data_dir, overrides, lock=False)


def _refused_before_the_workdir(run, config, workdir, exc, match):
  with pytest.raises(exc, match=match) as e:
    run(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()
  return e.value


def test_missing_or_unreadable_data_fails_before_the_workdir(tmp_path, cifar10_subset_dir):
  never = tmp_path / "never"
  for run in (search.run, train_eval.run):
    config = (tiny_config(str(tmp_path / "no_data")) if run is search.run
              else train_eval.default_config())
    config.data.data_dir = str(tmp_path / "no_data")
    _refused_before_the_workdir(run, config, never, dataset.DatasetNotFoundError,
                                r"no_data' does not exist.*config.data.data_dir")
  # A layout folder without its test file, and one whose test file cannot be read.
  layout = tmp_path / "layout" / "cifar-10-batches-bin"
  layout.mkdir(parents=True)
  (layout / "data_batch_1.bin").symlink_to(os.path.join(cifar10_subset_dir, "data_batch_1.bin"))
  _refused_before_the_workdir(search.run, tiny_config(str(layout)), never,
                              dataset.DatasetNotFoundError,
                              r"test_batch\.bin' does not exist; point config.data.data_dir")
  (layout / "test_batch.bin").mkdir()  # opening it fails (IsADirectoryError)
  _refused_before_the_workdir(search.run, tiny_config(str(layout)), never,
                              dataset.DatasetError,
                              r"test_batch\.bin' cannot be read .*config.data.data_dir")
  assert dataset.check_data(tiny_config(cifar10_subset_dir).data).endswith(
      "cifar-10-batches-bin")


def test_named_nb201_table_that_does_not_load_fails_before_the_workdir(
    tmp_path, cifar10_subset_dir, monkeypatch):
  monkeypatch.delenv(nb201.TABLE_ENV_VAR, raising=False)
  never = tmp_path / "never"
  config = tiny_config(cifar10_subset_dir, **{"nb201.table": "/nonexistent/table.zip"})
  _refused_before_the_workdir(
      search.run, config, never, errors.ConfigError,
      r"^config.nb201.table='/nonexistent/table.zip': /nonexistent/table.zip does not exist; fix "
      r"the path .* or unset it to search without NAS-Bench-201 look-ups$")
  bad_csv = tmp_path / "table.csv"
  bad_csv.write_text("arch;accuracy\n")
  config = tiny_config(cifar10_subset_dir, **{"nb201.table": str(bad_csv)})
  _refused_before_the_workdir(search.run, config, never, errors.ConfigError,
                              r"config.nb201.table=.*table.csv' cannot be loaded \(ValueError: "
                              r".*header 'arch,accuracy'")
  # Named through the environment instead of the config.
  monkeypatch.setenv(nb201.TABLE_ENV_VAR, str(tmp_path / "missing.zip"))
  _refused_before_the_workdir(search.run, tiny_config(cifar10_subset_dir), never,
                              errors.ConfigError, r"^\$BNAS_NB201_TABLE=.*missing.zip")


def test_unnamed_absent_default_table_turns_look_ups_off_said_once(tmp_path, cifar10_subset_dir,
                                                                   monkeypatch, caplog):
  monkeypatch.delenv(nb201.TABLE_ENV_VAR, raising=False)
  monkeypatch.setenv("BNAS_SHARED", str(tmp_path))  # no nb201/ table there
  config = tiny_config(cifar10_subset_dir)
  with caplog.at_level(logging.WARNING):
    search.check_inputs(config)  # not asked for: no error, and nothing logged by the check
    assert not caplog.records
    assert search_config.load_nb201_table(config) is None
  assert [r.getMessage().split(":")[0] for r in caplog.records] == [
      "NAS-Bench-201 look-ups are off"]
  # Another space never looks at the table.
  assert search_config.load_nb201_table(
      tiny_config(cifar10_subset_dir, space="bayesnas", **{"nb201.table": "/x.zip"})) is None


def test_missing_genotype_file_is_named_before_the_workdir(tmp_path):
  config = train_eval.default_config()
  config.genotype = str(tmp_path / "genotype.json")
  _refused_before_the_workdir(train_eval.run, config, tmp_path / "never", errors.ConfigError,
                              r"^config.genotype / config.model: .*genotype.json' is neither a "
                              r"registered genotype")


def test_command_line_misspelt_table_is_one_line_and_exit_2(tmp_path, cifar10_subset_dir):
  workdir = tmp_path / "never"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(nb201.TABLE_ENV_VAR, None)
  proc = subprocess.run(
      [sys.executable, "-m", "bnas_jax.main", f"--config={TINY}", f"--workdir={workdir}",
       f"--config.data.data_dir={cifar10_subset_dir}", "--config.nb201.table=/nonexistent/table.zip"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "bnas_jax.main: error: config.nb201.table='/nonexistent/table.zip': /nonexistent/table.zip "
      "does not exist; fix the path (a NASLib nb201 zip or an 'arch,accuracy' CSV), or unset it "
      "to search without NAS-Bench-201 look-ups"], proc.stderr[-3000:]
  assert not workdir.exists()


def test_nb201_look_ups_are_off_for_other_data_unless_a_table_is_named(
    tmp_path, cifar10_subset_dir, monkeypatch, caplog):
  monkeypatch.delenv(nb201.TABLE_ENV_VAR, raising=False)
  load = search_config.load_nb201_table
  if load(tiny_config(cifar10_subset_dir), log=False) is None:
    pytest.fail("the default NAS-Bench-201 table did not load (shared/nb201 is part of the setup)")
  own = tiny_config(cifar10_subset_dir, **{"data.name": "shapes48"})
  with caplog.at_level(logging.WARNING):
    assert load(own) is None  # CIFAR-10 accuracies would not score a cell searched on shapes48
  assert "config.data.name='shapes48'" in caplog.records[-1].getMessage()
  # A table the user names is still loaded.
  named = tiny_config(cifar10_subset_dir, **{"data.name": "shapes48",
                                             "nb201.table": nb201.default_table_path()})
  assert load(named) is not None
