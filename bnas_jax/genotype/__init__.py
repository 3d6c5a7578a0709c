"""Genotypes: derived cells as data, their formats, derivation from the HARD prior, pictures, names.

* `bnas_jax.genotype.cell`: the `Genotype` data type and its JSON file format.
* `bnas_jax.genotype.formats`: DARTS namedtuple and NAS-Bench-201 arch-string conversions.
* `bnas_jax.genotype.derivation`: `derive` (the alive mask and scores of the HARD prior -> a
  connected genotype), `derive_darts` (top-2 export), `derive_nb201` (one op per edge).
* `bnas_jax.genotype.pictures`: `plot`, one arc diagram per cell type (PNG + SVG).
* `bnas_jax.genotype.named`: the registry of published cells (`get_genotype`, `load_genotype`,
  `register`).

The public names of those modules are re-exported here (``from bnas_jax import genotype``). The
package needs numpy only (matplotlib is imported inside `plot`).
"""

from bnas_jax.genotype.cell import CELL_TYPES, FORMAT_VERSION, DartsGenotype, Genotype, Triple
from bnas_jax.genotype.derivation import derive, derive_darts, derive_nb201, prune_disconnected
from bnas_jax.genotype.formats import from_darts, from_nb201_string, to_darts, to_nb201_string
from bnas_jax.genotype.named import NAMED_GENOTYPES, get_genotype, load_genotype, register
from bnas_jax.genotype.pictures import plot

__all__ = [
    "CELL_TYPES", "FORMAT_VERSION", "DartsGenotype", "Genotype", "Triple", "derive",
    "derive_darts", "derive_nb201", "prune_disconnected", "from_darts", "from_nb201_string",
    "to_darts", "to_nb201_string", "NAMED_GENOTYPES", "get_genotype", "load_genotype", "register",
    "plot",
]
