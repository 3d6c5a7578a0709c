"""Which read-out of the stored posterior picks the best NAS-Bench-201 cell?

For each finished NB201 search run (its final ``prior.npz``), picks one op per edge by several
read-outs of the stored quantities (γ, the switches S, the posterior variance C, the curvature H,
ω) and looks the cells up in the NAS-Bench-201 validation table (``cifar10-valid``; the test
accuracies are never used). γ is what the search exports; the others are for comparison only.
Edges are not pruned in these runs, so every read-out picks an op on every edge.

Usage:
  python bench/nb201_readouts.py runs/nb201_seeds/ggn_fast_seed* runs/nb201_seeds/recursive_seed*
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bnas_jax import nb201

# name -> f(prior.npz arrays) -> f32[E, K] op scores (origin column dropped; cells averaged).
READOUTS = {
    "gamma (exported)": lambda z: z["gamma/normal"][0][:, 1:],
    "mean abs(S)": lambda z: np.abs(z["switches/normal"][:, :, 1:]).mean(0),
    "norm(S)": lambda z: np.sqrt((z["switches/normal"][:, :, 1:] ** 2).sum(0)),
    "abs(S) / sqrt(C)": lambda z: (np.abs(z["switches/normal"][:, :, 1:])
                                / np.sqrt(z["posterior_variance/normal"][:, :, 1:])).mean(0),
    "gamma / C": lambda z: (z["gamma/normal"][:, :, 1:]
                            / z["posterior_variance/normal"][:, :, 1:]).mean(0),
    "C": lambda z: z["posterior_variance/normal"][:, :, 1:].mean(0),
    "H": lambda z: z["curvature/normal"][:, :, 1:].mean(0),
    "S^2 H": lambda z: (z["switches/normal"][:, :, 1:] ** 2
                        * z["curvature/normal"][:, :, 1:]).mean(0),
    "1 / omega": lambda z: 1.0 / z["omega/normal"][:, 1:],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="workdirs of finished nb201 search runs")
  parser.add_argument("--table", default=None, help="NB201 table (default: the shared one)")
  args = parser.parse_args()
  table = nb201.load_table(args.table or nb201.default_table_path())
  ops = list(nb201.OPS[1:]) if nb201.OPS[0] == "none" else list(nb201.OPS)
  rows = {name: [] for name in READOUTS}
  for run in args.runs:
    z = np.load(os.path.join(run, "prior.npz"))
    for name, fn in READOUTS.items():
      pick = [ops[int(np.argmax(e))] for e in fn(z)]
      arch = (f"|{pick[0]}~0|+|{pick[1]}~0|{pick[2]}~1|+|{pick[3]}~0|{pick[4]}~1|"
              f"{pick[5]}~2|")
      rows[name].append(table.accuracy(arch))
  print(f"{len(args.runs)} runs; NB201 {table.dataset} validation accuracy of the cell each "
        "read-out picks")
  print("| read-out | mean | min | max |\n|---|---|---|---|")
  for name, accs in rows.items():
    print(f"| {name} | {np.mean(accs):.2f} | {min(accs):.2f} | {max(accs):.2f} |")


if __name__ == "__main__":
  main()
