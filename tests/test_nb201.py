"""Tests of bnas_jax.nb201: arch encodings and the NAS-Bench-201 accuracy table."""

import itertools
import os
import time

import pytest

from bnas_jax import nb201

# The shared folder's copy, found relative to the repo (CI clones it with shared/ beside it).
ZIP = nb201.default_table_path()

# Reference values of shared/nb201/README.md (cifar10 validation accuracy, %).
REFERENCE = {
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|"
    "nor_conv_1x1~2|": 91.18,
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "nor_conv_3x3~2|": 90.36,
    "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|"
    "skip_connect~2|": 39.98,
}
BEST_TUPLE, BEST_ACC = (2, 3, 0, 2, 3, 2), 91.57


@pytest.fixture(scope="module")
def cifar10():
  return nb201.load_table(ZIP, "cifar10")


def test_reference_values(cifar10):
  assert len(cifar10) == 15625
  for arch, acc in REFERENCE.items():
    assert cifar10.accuracy(arch) == pytest.approx(acc, abs=1e-4)
  assert cifar10.accuracy(BEST_TUPLE) == pytest.approx(BEST_ACC, abs=1e-4)
  best_arch, best_acc = cifar10.best()
  assert best_acc == pytest.approx(BEST_ACC, abs=1e-4)
  assert nb201.arch_to_naslib(best_arch) == BEST_TUPLE


def test_tuple_conversion_by_hand():
  # README: tuple edge order (0->1),(0->2),(0->3),(1->2),(1->3),(2->3); ops 0 skip, 1 none,
  # 2 conv3x3, 3 conv1x1, 4 avg. Converted by hand into string order (0->1 | 0->2 1->2 | 0->3 ...).
  assert nb201.naslib_to_arch("(2, 2, 4, 3, 0, 0)") == (
      "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|avg_pool_3x3~0|skip_connect~1|"
      "skip_connect~2|")
  assert nb201.naslib_to_arch(BEST_TUPLE) == (
      "|nor_conv_3x3~0|+|nor_conv_1x1~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|"
      "nor_conv_3x3~2|")
  assert nb201.arch_to_naslib(
      "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|") == (1,) * 6


def test_all_cells_round_trip(cifar10):
  all_tuples = list(itertools.product(range(5), repeat=6))
  strings = [nb201.naslib_to_arch(t) for t in all_tuples]
  assert len(set(strings)) == 15625
  assert set(strings) == set(nb201.all_arch_strings())
  for t, s in zip(all_tuples, strings):
    assert nb201.arch_to_naslib(s) == t
    assert nb201.format_arch_string(nb201.parse_arch_string(s)) == s
    assert t in cifar10  # the table covers every cell
  # accuracy by string and by tuple agree
  for t in all_tuples[::997]:
    assert cifar10.accuracy(nb201.naslib_to_arch(t)) == cifar10.accuracy(t)


def test_other_datasets_and_cache(cifar10):
  t0 = time.perf_counter()
  again = nb201.load_table(ZIP, "cifar10")
  assert again is cifar10
  assert time.perf_counter() - t0 < 0.05
  c100 = nb201.load_table(ZIP, "cifar100")
  assert len(c100) == 15625 and c100.dataset == "cifar100"
  arch = next(iter(REFERENCE))
  assert c100.accuracy(arch) != cifar10.accuracy(arch)
  assert 0.0 < c100.accuracy(arch) < cifar10.accuracy(arch)  # cifar100 is harder
  with pytest.raises(ValueError, match="ImageNet16-120"):
    nb201.load_table(ZIP, "imagenet")


def test_missing_table_error(tmp_path):
  missing = tmp_path / "nope.zip"
  with pytest.raises(FileNotFoundError) as err:
    nb201.load_table(str(missing))
  msg = str(err.value)
  assert str(missing) in msg and "arch,accuracy" in msg and nb201.TABLE_ENV_VAR in msg


def test_env_var_default(tmp_path, monkeypatch):
  monkeypatch.setenv(nb201.TABLE_ENV_VAR, str(tmp_path / "absent.csv"))
  with pytest.raises(FileNotFoundError, match="absent.csv"):
    nb201.load_table()


def test_csv_table(tmp_path):
  path = tmp_path / "table.csv"
  rows = list(REFERENCE.items())
  path.write_text("arch,accuracy\n" + "".join(f"{a},{v}\n" for a, v in rows))
  table = nb201.load_table(str(path))
  assert len(table) == 3
  for arch, acc in rows:
    assert table.accuracy(arch) == acc
  with pytest.raises(KeyError, match="no entry"):
    table.accuracy("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")
  # A rewritten file is read again (cache key includes mtime and size).
  path.write_text("arch,accuracy\n" + f"{rows[0][0]},12.5\n")
  os.utime(path, ns=(1, 1))
  assert nb201.load_table(str(path)).accuracy(rows[0][0]) == 12.5
  bad = tmp_path / "bad.csv"
  bad.write_text("genotype,acc\nx,1\n")
  with pytest.raises(ValueError, match="arch,accuracy"):
    nb201.load_table(str(bad))
  dup = tmp_path / "dup.csv"
  dup.write_text(f"arch,accuracy\n{rows[0][0]},1\n{rows[0][0]},2\n")
  with pytest.raises(ValueError, match=r"dup.csv:3"):
    nb201.load_table(str(dup))


@pytest.mark.parametrize("bad", [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|",  # two groups
    "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # unknown op
    "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|",  # wrong source index
    "|none~0|+|none~0|+|none~0|none~1|none~2|",  # wrong group length
    "none~0+|none~0|none~1|+|none~0|none~1|none~2|",  # missing bars
])
def test_bad_strings(bad):
  with pytest.raises(ValueError, match="NAS-Bench-201 arch string"):
    nb201.parse_arch_string(bad)


def test_bad_tuples():
  for bad in [(0, 1, 2), (0, 1, 2, 3, 4, 5), "(1, 2"]:
    with pytest.raises(ValueError, match="NASLib arch tuple"):
      nb201.naslib_to_arch(bad)
