"""Tests of bnas_jax.files (atomic text writes) and of config_files.write_config on a workdir."""

import logging
import os

import ml_collections
import pytest

from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import files


def test_write_text_atomic_replaces_and_leaves_no_temp_file(tmp_path):
  path = tmp_path / "sub" / "a.json"
  files.write_text_atomic(str(path), "one\n")
  files.write_text_atomic(str(path), "two\n")
  assert path.read_text() == "two\n"
  assert sorted(os.listdir(path.parent)) == ["a.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_text_atomic_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
  target = tmp_path / "d"
  target.mkdir()  # os.replace of a file onto a folder fails
  with pytest.raises(OSError):
    files.write_text_atomic(str(target), "x")
  assert target.is_dir() and os.listdir(tmp_path) == ["d"]


def test_save_figure_writes_png_and_svg_and_closes_the_figure(tmp_path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = plt.figure()
  fig.gca().plot([0, 1], [1, 0])
  png, svg = files.save_figure(fig, str(tmp_path / "pics" / "f"))
  assert (png, svg) == (str(tmp_path / "pics" / "f.png"), str(tmp_path / "pics" / "f.svg"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert "<svg" in open(svg).read()
  assert not plt.fignum_exists(fig.number)


def test_write_config_replaces_the_config_of_a_workdir_without_checkpoints(tmp_path, caplog):
  # An attempt that stopped at start-up (bad data, say) left a config.json and no checkpoint:
  # any field may change, said in an info line; with a checkpoint the change is refused.
  workdir = str(tmp_path)
  old = ml_collections.ConfigDict({"data": {"size": 100_000}, "seed": 0})
  new = ml_collections.ConfigDict({"data": {"size": 2_000}, "seed": 0})
  config_files.write_config(old, workdir, resume_safe=("seed",))
  with caplog.at_level(logging.INFO):
    config_files.write_config(new, workdir, resume_safe=("seed",))
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("holds no checkpoint yet" in r.getMessage() for r in caplog.records)
  with open(os.path.join(workdir, config_files.CONFIG_JSON)) as f:
    assert '"size": 2000' in f.read()
  assert os.path.exists(os.path.join(workdir, config_files.PREVIOUS_JSON))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  with pytest.raises(errors.ConfigError, match="data.size"):
    config_files.write_config(old, workdir, resume_safe=("seed",))
