"""NAS-Bench-201 cell encodings and accuracy lookup (numpy only, imports fast).

A NAS-Bench-201 cell has 4 nodes (0 = input, 3 = output) and 6 edges i -> j (i < j), each carrying
exactly one op of ``none``, ``skip_connect``, ``nor_conv_1x1``, ``nor_conv_3x3``, ``avg_pool_3x3``
(Dong & Yang, ICLR 2020). Two encodings are in use:

* the standard *arch string* groups the edges by target node j = 1, 2, 3 and lists the sources
  i < j in order: ``|op01~0|+|op02~0|op12~1|+|op03~0|op13~1|op23~2|``;
* the NASLib benchmark files (``naslib_nb201_zen_valacc.zip``) store a 6-tuple of op indices in
  edge order (0->1), (0->2), (0->3), (1->2), (1->3), (2->3) with op index 0 = ``skip_connect``,
  1 = ``none``, 2 = ``nor_conv_3x3``, 3 = ``nor_conv_1x1``, 4 = ``avg_pool_3x3``.

`NB201Table` maps a cell (either encoding) to an accuracy in percent. It loads the NASLib zip
(``naslib_nb201_zen_valacc.zip``: JSON files per data set holding ``val_accuracy``, the validation
accuracy after the 200-epoch schedule) or a CSV file with the header ``arch,accuracy`` (arch = the
standard string). `load_table` caches the parsed table per process.
"""

from __future__ import annotations

import ast
import csv
import functools
import itertools
import json
import os
import re
import types
import zipfile
from typing import Iterator, Mapping, Sequence, Union

# Op names of the standard string; 'none' = the zero op.
OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# Edges (source, target) in the order of the standard string.
STRING_EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
# Edges and op indices of the NASLib tuple encoding.
NASLIB_EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
NASLIB_OPS: tuple[str, ...] = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1",
                               "avg_pool_3x3")
NUM_NODES = 4
NUM_CELLS = len(OPS) ** len(STRING_EDGES)  # 15,625
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "ImageNet16-120")

# The table's file name in the project's shared folder; override with $BNAS_NB201_TABLE or a path.
TABLE_FILE = os.path.join("nb201", "naslib_nb201_zen_valacc.zip")
TABLE_ENV_VAR = "BNAS_NB201_TABLE"


def default_table_path() -> str:
  """Where the table is looked for when no path is given.

  ``$BNAS_NB201_TABLE`` if set, else ``shared/nb201/naslib_nb201_zen_valacc.zip`` in
  ``$BNAS_SHARED``, ``<repo>/shared`` or ``<repo>/../shared`` (the first that holds it; the last
  candidate is returned when none does, so the error names a concrete path).
  """
  env = os.environ.get(TABLE_ENV_VAR)
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shared = os.environ.get("BNAS_SHARED")
  roots = [shared] if shared else [os.path.join(repo, "shared"), os.path.join(repo, "..", "shared")]
  candidates = [os.path.normpath(os.path.join(r, TABLE_FILE)) for r in roots]
  for c in candidates:
    if os.path.isfile(c):
      return c
  return candidates[-1]

Arch = Union[str, Sequence[int]]

_TOKEN = re.compile(r"^([A-Za-z0-9_]+)~(\d+)$")


def parse_arch_string(arch: str) -> dict[tuple[int, int], str]:
  """Parses a standard NAS-Bench-201 arch string.

  Args:
    arch: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (surrounding whitespace is ignored).

  Returns:
    ``{(source, target): op}`` for all 6 edges (``'none'`` included).

  Raises:
    ValueError: naming the string and what is wrong (group count, source order, unknown op).
  """
  if not isinstance(arch, str):
    raise ValueError(f"NAS-Bench-201 arch must be a string, got {type(arch).__name__}: {arch!r}")
  groups = arch.strip().split("+")
  if len(groups) != NUM_NODES - 1:
    raise ValueError(f"bad NAS-Bench-201 arch string {arch!r}: expected 3 '+'-separated groups "
                     "like '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'")
  edges = {}
  for target, group in enumerate(groups, start=1):
    if not (group.startswith("|") and group.endswith("|")) or len(group) < 2:
      raise ValueError(f"bad NAS-Bench-201 arch string {arch!r}: group {group!r} must be "
                       "enclosed in '|'")
    tokens = group[1:-1].split("|")
    if len(tokens) != target:
      raise ValueError(f"bad NAS-Bench-201 arch string {arch!r}: group for node {target} must "
                       f"list {target} op(s), got {tokens}")
    for expected_source, token in enumerate(tokens):
      match = _TOKEN.match(token)
      if match is None or int(match.group(2)) != expected_source:
        raise ValueError(f"bad NAS-Bench-201 arch string {arch!r}: token {token!r} for node "
                         f"{target} should read 'op~{expected_source}'")
      op = match.group(1)
      if op not in OPS:
        raise ValueError(f"bad NAS-Bench-201 arch string {arch!r}: unknown op {op!r}; "
                         f"choose from {list(OPS)}")
      edges[(expected_source, target)] = op
  return edges


def format_arch_string(edge_ops: Mapping[tuple[int, int], str]) -> str:
  """Inverse of `parse_arch_string`; edges missing from `edge_ops` are ``'none'``.

  Raises:
    ValueError: for an edge that is not a NAS-Bench-201 edge or an unknown op.
  """
  for edge, op in edge_ops.items():
    if tuple(edge) not in STRING_EDGES:
      raise ValueError(f"{edge!r} is not a NAS-Bench-201 edge; edges are {list(STRING_EDGES)}")
    if op not in OPS:
      raise ValueError(f"unknown NAS-Bench-201 op {op!r} on edge {edge}; choose from {list(OPS)}")
  groups = []
  for target in range(1, NUM_NODES):
    tokens = [f"{edge_ops.get((source, target), 'none')}~{source}" for source in range(target)]
    groups.append("|" + "|".join(tokens) + "|")
  return "+".join(groups)


def arch_to_naslib(arch: str) -> tuple[int, ...]:
  """Standard arch string -> NASLib 6-tuple (edge order and op indices of `NASLIB_EDGES`/`_OPS`)."""
  edges = parse_arch_string(arch)
  return tuple(NASLIB_OPS.index(edges[e]) for e in NASLIB_EDGES)


def naslib_to_arch(arch: Sequence[int]) -> str:
  """NASLib 6-tuple (or its string form ``"(2, 2, 4, 3, 0, 0)"``) -> standard arch string.

  Raises:
    ValueError: if `arch` is not 6 op indices in 0..4.
  """
  codes = _naslib_tuple(arch)
  return format_arch_string({e: NASLIB_OPS[c] for e, c in zip(NASLIB_EDGES, codes)})


def _naslib_tuple(arch) -> tuple[int, ...]:
  if isinstance(arch, str):
    try:
      arch = ast.literal_eval(arch)
    except (ValueError, SyntaxError):
      raise ValueError(f"bad NASLib arch tuple {arch!r}: expected e.g. '(2, 2, 4, 3, 0, 0)'") \
          from None
  try:
    codes = tuple(int(c) for c in arch)
  except (TypeError, ValueError):
    raise ValueError(f"bad NASLib arch tuple {arch!r}: expected 6 op indices in 0..4") from None
  if len(codes) != len(NASLIB_EDGES) or any(not 0 <= c < len(NASLIB_OPS) for c in codes):
    raise ValueError(f"bad NASLib arch tuple {arch!r}: expected 6 op indices in 0..4 "
                     f"(ops {list(NASLIB_OPS)})")
  return codes


def all_arch_strings() -> Iterator[str]:
  """All 15,625 cells of the space as standard arch strings (lexicographic in `OPS` order)."""
  for ops in itertools.product(OPS, repeat=len(STRING_EDGES)):
    yield format_arch_string(dict(zip(STRING_EDGES, ops)))


def _key(arch: Arch) -> tuple[int, ...]:
  """Canonical lookup key (NASLib tuple) of an arch string or NASLib tuple."""
  if isinstance(arch, str) and "~" in arch:
    return arch_to_naslib(arch)
  return _naslib_tuple(arch)


class NB201Table:
  """Read-only accuracy table of NAS-Bench-201 cells.

  Attributes:
    dataset: the data set the accuracies belong to (``'cifar10'``, ...; ``'csv'`` tables keep the
      name they were loaded with).
    source: the file the table was read from.
  """

  def __init__(self, accuracies: Mapping[tuple[int, ...], float], dataset: str, source: str):
    self._acc = types.MappingProxyType(dict(accuracies))
    self.dataset = dataset
    self.source = source

  def __len__(self) -> int:
    return len(self._acc)

  def __contains__(self, arch: Arch) -> bool:
    return _key(arch) in self._acc

  def __repr__(self) -> str:
    return f"NB201Table(dataset={self.dataset!r}, cells={len(self)}, source={self.source!r})"

  def accuracy(self, arch: Arch) -> float:
    """Accuracy in percent of `arch` (a standard arch string or a NASLib tuple).

    Raises:
      ValueError: if `arch` is malformed.
      KeyError: if the table has no entry for `arch` (possible with partial CSV tables).
    """
    key = _key(arch)
    try:
      return self._acc[key]
    except KeyError:
      raise KeyError(f"NAS-Bench-201 table {self.source} ({self.dataset}) has no entry for "
                     f"{naslib_to_arch(key)}") from None

  def items(self) -> Iterator[tuple[str, float]]:
    """``(arch string, accuracy)`` pairs."""
    for key, acc in self._acc.items():
      yield naslib_to_arch(key), acc

  def best(self) -> tuple[str, float]:
    """The cell with the highest accuracy and that accuracy."""
    key = max(self._acc, key=self._acc.__getitem__)
    return naslib_to_arch(key), self._acc[key]

  @classmethod
  def from_naslib_zip(cls, path: str, dataset: str = "cifar10") -> "NB201Table":
    """Reads ``zen/benchmark--nasbench201--{dataset}--*.json`` from the NASLib zip.

    Raises:
      ValueError: unknown `dataset`, or the zip lacks / duplicates cells for it.
    """
    _check_dataset(dataset)
    prefix = f"benchmark--nasbench201--{dataset}--"
    acc = {}
    with zipfile.ZipFile(path) as zf:
      names = [n for n in zf.namelist()
               if os.path.basename(n).startswith(prefix) and n.endswith(".json")]
      for name in names:
        for entry in json.loads(zf.read(name)):
          key = _naslib_tuple(entry["arch"])
          if key in acc:
            raise ValueError(f"{path}: cell {entry['arch']} appears twice for {dataset}")
          acc[key] = float(entry["val_accuracy"])
    if len(acc) != NUM_CELLS:
      raise ValueError(f"{path}: expected {NUM_CELLS} cells for {dataset}, found {len(acc)} "
                       f"(in {len(names)} JSON files named {prefix}*.json)")
    return cls(acc, dataset, path)

  @classmethod
  def from_csv(cls, path: str, dataset: str = "csv") -> "NB201Table":
    """Reads a CSV file with header ``arch,accuracy`` (arch = standard string, accuracy in %).

    Raises:
      ValueError: wrong header, a malformed row, or a duplicated cell (naming the line).
    """
    acc = {}
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or [h.strip() for h in header] != ["arch", "accuracy"]:
        raise ValueError(f"{path}: the first line must be the header 'arch,accuracy', "
                         f"got {header!r}")
      for line_no, row in enumerate(reader, start=2):
        if not row:
          continue
        if len(row) != 2:
          raise ValueError(f"{path}:{line_no}: expected 'arch,accuracy', got {row!r}")
        key = arch_to_naslib(row[0])
        if key in acc:
          raise ValueError(f"{path}:{line_no}: cell {row[0]} appears twice")
        try:
          acc[key] = float(row[1])
        except ValueError:
          raise ValueError(f"{path}:{line_no}: accuracy {row[1]!r} is not a number") from None
    return cls(acc, dataset, path)


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"unknown NAS-Bench-201 dataset {dataset!r}; choose one of {list(DATASETS)}")


def load_table(path: str | None = None, dataset: str = "cifar10") -> NB201Table:
  """Loads (once per process and file version) a NAS-Bench-201 accuracy table.

  Args:
    path: a NASLib zip (``*.zip``) or a CSV file (``arch,accuracy``). Default: ``$BNAS_NB201_TABLE``
      if set, else the shared folder's copy (`default_table_path`).
    dataset: ``'cifar10'``, ``'cifar100'`` or ``'ImageNet16-120'`` (used for zip files; a CSV
      holds one data set and keeps this name as a label).

  Raises:
    FileNotFoundError: naming the missing file and how to provide the table.
    ValueError: unknown dataset or malformed file.
  """
  _check_dataset(dataset)
  if path is None:
    path = default_table_path()
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"NAS-Bench-201 table not found: {path}. Provide either the NASLib zip "
        "(automl/NASLib, branch 'experiments', run/results/benchmarks/nb201_zen.zip) or a CSV "
        "file with the header 'arch,accuracy' (arch = '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'), "
        f"and pass its path or set ${TABLE_ENV_VAR}.")
  stat = os.stat(path)
  return _load_cached(path, stat.st_mtime_ns, stat.st_size, dataset)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int, dataset: str) -> NB201Table:
  del mtime_ns, size  # cache keys only: a rewritten file is read again
  if zipfile.is_zipfile(path):
    return NB201Table.from_naslib_zip(path, dataset)
  return NB201Table.from_csv(path, dataset)
