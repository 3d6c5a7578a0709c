"""Registry of named genotypes: published DARTS-family and BayesNAS cells, NAS-Bench-201 reference
cells (reference_numbers.md; BayesNAS cells from the released ``CNN/pre_trained/<lambda>/OneShot.py``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from bnas_jax import nb201
from bnas_jax.genotype.cell import DartsGenotype, Genotype
from bnas_jax.genotype.formats import from_darts, from_nb201_string


def _darts(normal, reduce) -> Genotype:
  return from_darts(DartsGenotype(normal, [2, 3, 4, 5], reduce, [2, 3, 4, 5]))


_K2, _K1, _N0 = 0, 1, 2  # c_{k-2}, c_{k-1}, intermediate node n0


def _bayesnas(normal: Mapping[int, Sequence[tuple[Sequence[str], int]]],
              reduce: Mapping[int, Sequence[tuple[Sequence[str], int]]]) -> Genotype:
  """Cells written as ``{node_index n: [((op, ...), source), ...]}``; node n has id ``2 + n``."""
  def triples(cell):
    return tuple((2 + n, source, op) for n, inputs in cell.items()
                 for ops, source in inputs for op in ops)
  return Genotype(space="bayesnas", normal=triples(normal), reduce=triples(reduce),
                  normal_concat=(2, 3, 4, 5), reduce_concat=(2, 3, 4, 5))


NAMED_GENOTYPES: dict[str, Genotype] = {
    "darts_v1": _darts(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)]),
    "darts_v2": _darts(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)]),
    "pc_darts": _darts(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]),
    "drnas": _darts(
        [("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("dil_conv_5x5", 3)],
        [("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2), ("sep_conv_5x5", 1),
         ("sep_conv_5x5", 1), ("dil_conv_5x5", 3), ("skip_connect", 4), ("sep_conv_5x5", 1)]),
    "gdas_v1": _darts(
        [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 3), ("skip_connect", 0), ("sep_conv_5x5", 4), ("sep_conv_3x3", 3)],
        [("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("sep_conv_5x5", 1),
         ("dil_conv_5x5", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)]),
    "bayesnas_0.01": _bayesnas(
        normal={0: [(("sep5",), _K1), (("sep5", "max", "avg", "ident"), _K2)],
                1: [(("max", "ident"), _K1)],
                2: [(("ident",), _K1), (("max",), _K2)],
                3: [(("avg",), _N0)]},
        reduce={0: [(("ident",), _K1), (("sep3", "avg", "max", "sep5"), _K2)],
                1: [(("max", "avg"), _K2)],
                2: [(("sep3", "avg"), _K2)],
                3: [(("sep5",), _N0)]}),
    # lambda 0.007 normal n1: the released code also declares max@in1 (k-2) but never uses it in
    # the forward pass, so it is not part of the cell.
    "bayesnas_0.007": _bayesnas(
        normal={0: [(("sep3", "ident"), _K2)],
                1: [(("sep3", "ident"), _K1)],
                2: [(("ident",), _K1), (("sep3",), _K2)],
                3: [(("sep5", "max", "avg"), _K2), (("ident",), _N0)]},
        reduce={0: [(("sep5", "avg"), _K1), (("avg", "max", "ident", "sep5"), _K2)],
                1: [(("avg",), _K2), (("ident",), _N0)],
                2: [(("avg",), _K2), (("sep5", "ident"), _N0)],
                3: [(("avg", "max"), _N0)]}),
    "bayesnas_0.005": _bayesnas(
        normal={0: [(("max", "avg", "ident"), _K2)],
                1: [(("ident",), _K1), (("sep5",), _K2)],
                2: [(("avg",), _K1), (("ident", "max"), _K2)],
                3: [(("sep5",), _K2), (("max",), _N0)]},
        reduce={0: [(("sep3", "sep5", "max"), _K1), (("avg", "max"), _K2)],
                1: [(("max", "avg", "ident"), _N0)],
                2: [(("ident", "max"), _K2)],
                3: [(("sep3", "max"), _K2), (("max",), _N0)]}),
    # NAS-Bench-201 reference cells (values in the NASLib validation table, see bnas_jax.nb201).
    "nb201_all_skip": from_nb201_string(
        "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|"
        "skip_connect~2|"),
    "nb201_all_conv3": from_nb201_string(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|"
        "nor_conv_3x3~2|"),
    # Best cifar10 validation accuracy in the NASLib table (NASLib tuple (2, 3, 0, 2, 3, 2)).
    "nb201_best_val": from_nb201_string(nb201.naslib_to_arch((2, 3, 0, 2, 3, 2))),
}


def register(name: str, genotype: Any) -> None:
  """Adds `genotype` to the registry under `name` (for spaces defined outside this package).

  Raises:
    ValueError: if `name` is already registered with a different genotype.
  """
  if name in NAMED_GENOTYPES and NAMED_GENOTYPES[name] != genotype:
    raise ValueError(f"genotype name {name!r} is already registered; choose another name")
  NAMED_GENOTYPES[name] = genotype


def get_genotype(name: str) -> Genotype:
  """Returns the registered genotype `name`.

  Raises:
    ValueError: naming the unknown genotype and listing the registered names.
  """
  try:
    return NAMED_GENOTYPES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown genotype {name!r}; registered names: "
                     f"{sorted(NAMED_GENOTYPES)}") from None


def load_genotype(name_or_path: str) -> Genotype:
  """A registered genotype name, or the path of a genotype JSON file (see `Genotype.save`).

  Raises:
    ValueError: if `name_or_path` is neither a registered name nor an existing file.
  """
  if name_or_path in NAMED_GENOTYPES:
    return NAMED_GENOTYPES[name_or_path]
  if os.path.isfile(name_or_path):
    return Genotype.load(name_or_path)
  raise ValueError(f"{name_or_path!r} is neither a registered genotype "
                   f"({sorted(NAMED_GENOTYPES)}) nor an existing genotype JSON file")
