"""NAS-Bench-201 quality of the search over seeds: the table the README quotes.

Runs ``python -m bnas_jax.main --config <config>`` once per seed and curvature kind (one process
each, one after another, so that the wall time of a seed is its own), reads each run's
``summary.json``, and prints a markdown table: per seed the found cell (arch string), its
NAS-Bench-201 validation accuracy (``cifar10-valid`` for CIFAR-10), the supernet's val accuracy
and the wall time of the whole run (compilation included; a warm compilation cache makes it
shorter); then mean +/- std per kind beside published one-shot references. Runs that already
finished in ``--root`` are read back, not rerun (delete the folder to rerun).

The accuracies come from the validation table only (``config.nb201.table``); the benchmark's test
accuracies are not used anywhere.

Usage:
  python bench/nb201_seeds.py                                  # 5 seeds, the default kind
  python bench/nb201_seeds.py --kinds ggn_fast,recursive --seeds 0,1,2,3,4
  python bench/nb201_seeds.py --config experiments/nb201_cifar10.py --root runs/nb201_seeds
  python bench/nb201_seeds.py -- --config.search.iterations=6   # extra overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Reference cells, looked up in the same validation table (config.nb201.table) when it is there.
REFERENCE_CELLS = (
    ("all skip_connect (the DARTS collapse cell)",
     "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"),
    ("all nor_conv_3x3",
     "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"),
    ("all nor_conv_3x3 but skip_connect on 0->3",
     "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"),
)


def _in_top_family(arch: str) -> bool:
  """nor_conv_3x3 on 0->1 and skip_connect on 0->3 (as in 13 of the 14 cells at or above 91.2 %
  valid), with a convolution on each of the four other edges."""
  from bnas_jax import nb201  # pylint: disable=g-import-not-at-top
  ops = nb201.parse_arch_string(arch)
  convs = ("nor_conv_1x1", "nor_conv_3x3")
  return (ops[0, 1] == "nor_conv_3x3" and ops[0, 3] == "skip_connect"
          and all(ops[e] in convs for e in ((0, 2), (1, 2), (1, 3), (2, 3))))


def _run(config: str, workdir: str, seed: int, kind: str, extra: list[str]) -> float:
  cmd = [sys.executable, "-m", "bnas_jax.main", "--config", config, "--workdir", workdir,
         f"--config.seed={seed}", f"--config.curvature.kind={kind}",
         "--config.progress_bar=False", *extra]
  print("$", " ".join(cmd), flush=True)
  os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
  start = time.perf_counter()
  with open(workdir + ".log", "w") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  if rc != 0:
    raise SystemExit(f"the run for seed {seed} ({kind}) failed with exit status {rc}; see "
                     f"{workdir}.log")
  with open(os.path.join(workdir, "wall_time_s.txt"), "w") as f:
    f.write(f"{seconds:.1f}\n")
  return seconds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="experiments/nb201_cifar10.py:cpu")
  ap.add_argument("--seeds", default="0,1,2,3,4")
  ap.add_argument("--kinds", default="ggn_fast", help="comma-separated curvature kinds")
  ap.add_argument("--root", default="runs/nb201_seeds", help="one run folder per kind and seed")
  ap.add_argument("extra", nargs="*", help="config overrides for every run (after --)")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  kinds = args.kinds.split(",")
  rows = {}
  for kind in kinds:
    for seed in seeds:
      workdir = os.path.join(args.root, f"{kind}_seed{seed}")
      summary = os.path.join(workdir, "summary.json")
      if not os.path.exists(summary):
        _run(args.config, workdir, seed, kind, args.extra)
      with open(summary) as f:
        s = json.load(f)
      last = s["history"][-1]
      wall = os.path.join(workdir, "wall_time_s.txt")
      seconds = float(open(wall).read()) if os.path.exists(wall) else float("nan")
      rows[kind, seed] = (last["nb201_arch"], last["nb201_accuracy"], last["val_accuracy"],
                          seconds)

  print(f"\nNAS-Bench-201 validation accuracy of the found cell ({args.config})\n")
  print("| kind | seed | cell | NB201 valid % | supernet val % | wall time |")
  print("|---|---|---|---|---|---|")
  for (kind, seed), (arch, acc, val, sec) in rows.items():
    print(f"| {kind} | {seed} | `{arch}` | {acc:.2f} | {100 * val:.1f} | {sec / 60:.1f} min |")
  print("\n| kind | mean +/- std | min | max |")
  print("|---|---|---|---|")
  for kind in kinds:
    accs = [rows[kind, s][1] for s in seeds]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"| {kind} | {statistics.mean(accs):.2f} +/- {std:.2f} | {min(accs):.2f} | "
          f"{max(accs):.2f} |")
  from bnas_jax import nb201  # pylint: disable=g-import-not-at-top
  try:
    table = nb201.load_table(None, "cifar10")
  except (FileNotFoundError, ValueError) as e:
    print(f"\n(no reference look-ups: {e})")
    return
  print(f"\nReference cells in the same table ({table.dataset}):")
  for name, arch in REFERENCE_CELLS:
    print(f"  {table.accuracy(arch):.2f}  {name}")
  family = [a for arch, a in table.items() if _in_top_family(arch)]
  print(f"  {statistics.mean(family):.2f}  mean of the {len(family)} cells with nor_conv_3x3 on "
        f"0->1, skip_connect on 0->3 and a convolution (1x1 or 3x3) on every other edge "
        f"(range {min(family):.2f}-{max(family):.2f})")
  best, acc = table.best()
  ranks = sorted((a for _, a in table.items()), reverse=True)
  print(f"  {acc:.2f}  the best cell of the table, {best}")
  for kind in kinds:
    mean = statistics.mean(rows[kind, s][1] for s in seeds)
    print(f"  {kind}: the mean {mean:.2f} is reached by {sum(a >= mean for a in ranks)} of "
          f"{len(ranks)} cells")


if __name__ == "__main__":
  main()
