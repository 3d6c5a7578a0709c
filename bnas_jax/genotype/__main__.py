r"""Draw a genotype: ``python -m bnas_jax.genotype GENOTYPE --out PREFIX [--title TITLE]``.

GENOTYPE is a registered name (``darts_v2``, ``bayesnas_0.01``, ..., or a tree cell such as
``tree_cell_a``), the path of a genotype JSON file (a search's ``genotype.json``, cell or tree cell)
or a NAS-Bench-201 arch string (a search's ``nb201_arch.txt``, or its path). Writes ``PREFIX.png``
and ``PREFIX.svg`` and prints the genotype. Exit status 2 with
one line on stderr when GENOTYPE is none of these.
"""

from __future__ import annotations

import argparse
import os
import sys

from bnas_jax.genotype import formats, named, pictures
from bnas_jax.search_space import tree as tree_lib


def resolve(spec: str):
  """The `Genotype` or tree cell named by `spec` (a registered name, a JSON file, an NB201 arch
  string or a file holding one).

  Raises:
    ValueError: naming `spec` when it is none of these.
  """
  is_tree_file = os.path.isfile(spec) and tree_lib.is_tree_cell_json(spec)
  if spec in tree_lib.NAMED_TREE_CELLS or is_tree_file:
    return tree_lib.load_tree_cell(spec)
  if spec in named.NAMED_GENOTYPES or spec.endswith(".json"):
    return named.load_genotype(spec)
  text = spec
  if os.path.isfile(spec):
    with open(spec, encoding="utf-8") as f:
      text = f.read().strip()
  if text.startswith("|"):
    return formats.from_nb201_string(text)
  known = sorted(named.NAMED_GENOTYPES) + sorted(tree_lib.NAMED_TREE_CELLS)
  raise ValueError(f"{spec!r} is not a registered genotype ({known}), a "
                   "genotype JSON file or a NAS-Bench-201 arch string (or a file holding one)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bnas_jax.genotype", description=__doc__.split(
      "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("genotype", help="registered name, genotype JSON file or NB201 arch string")
  parser.add_argument("--out", required=True, help="output path without extension")
  parser.add_argument("--title", default=None, help="figure title (default: the space name)")
  args = parser.parse_args(argv)
  try:
    genotype = resolve(args.genotype)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  png, svg = pictures.plot(genotype, args.out, title=args.title)
  print(genotype)
  print(f"wrote {png} and {svg}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
