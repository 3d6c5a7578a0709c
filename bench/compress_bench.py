r"""Compression benchmarks: one network compressed by BayesNAS and the baselines, side by side.

One dense network is pretrained (``--experiment``, ``--variant``, ``method=dense``); every method
then starts from its ``pretrained/`` folder with the same data, split, epochs and export code
(compression spec 7.1), in one run directory per point under ``--root``:

* ``bayesnas``: the HARD-prior outer loop, one run per lambda of ``--bayes_lams``;
* ``group_lasso`` (B1): omega = 1 on the same switches, one run per lambda of ``--gl_lams``;
  both with ``compress.cost_weighting = --cost_weighting`` (``macs``: each group's lambda
  proportional to its MAC cost, the same weighting for both);
* ``l1_filter`` (B2): L1-norm pruning of a fraction ``r`` of every layer, ``--ratios``, then
  fine-tuning for the whole budget;
* ``random`` (B3): the per-layer counts of the selected BayesNAS point with random units.

Selection uses the validation split only (spec 4.1): a method's selected point is its smallest
``weights_kept`` (and, in a second table, its smallest ``macs_kept``) whose validation error is
within ``--tolerance`` points of the dense network's; its test error is then reported. The
verdict line says whether BayesNAS's selected points keep fewer weights and fewer MACs than every
baseline's. Outputs in ``--root``: ``results.json`` (every run's result),
``table.md`` (kept structure, errors, CR_w, MAC ratio per run and the selected points),
``compress_<model.name>.png`` / ``.svg`` (test error in % against kept weights and against MACs,
log x, titled with the network and the data of the config; collapsed runs, which keep nothing,
are left out of the plot).

A run directory that already holds ``result.json`` is reused (the benchmark resumes).

Benchmarks:

* (a) LeNet-5-Caffe, ``experiments/compress_lenet5.py:cpu`` (the defaults): the shared MNIST
  *test* files split 8,000 / 2,000; figures are not comparable with published results, which
  train on the 60,000-image split.
* (b) the VGG-like network at width 1/8 on CIFAR-10, ``experiments/compress_vgg_like.py:bench``
  (7 + 3 epochs on a CPU, not the published 200 + 60 + 20 at full width).

Run::

  python bench/compress_bench.py --root runs/compress_bench
  python bench/compress_bench.py --experiment experiments/compress_vgg_like.py --variant bench \
      --root runs/compress_vgg_bench --bayes_lams 1e-3,3e-3,1e-2,3e-2 --gl_lams 1e-3,3e-3,1e-2,3e-2 \
      --ratios 0.1,0.2,0.35,0.5
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bnas_jax import config_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from bnas_jax.compression import runner  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("root", os.path.join(REPO, "runs", "compress_bench"), "Run directories.")
flags.DEFINE_string("experiment", os.path.join(REPO, "experiments", "compress_lenet5.py"),
                    "Experiment file.")
flags.DEFINE_string("variant", "cpu", "Variant of the experiment file.")
flags.DEFINE_list("bayes_lams", ["0.0003", "0.0006", "0.001", "0.002", "0.003", "0.006"],
                  "BayesNAS lambdas.")
flags.DEFINE_list("gl_lams", ["0.0003", "0.0006", "0.001", "0.002", "0.003", "0.006"],
                  "Group-lasso (B1) lambdas.")
flags.DEFINE_enum("cost_weighting", "none", ["none", "macs", "weights"],
                  "compress.cost_weighting of the BayesNAS and group-lasso runs (per-group lambda "
                  "proportional to the group's MAC or weight cost; L1-norm and random ignore it).")
flags.DEFINE_list("ratios", ["0.2", "0.3", "0.4", "0.5", "0.7"], "L1-norm (B2) pruned fractions.")
flags.DEFINE_integer("seed", 0, "Seed of every run (network init, data order).")
flags.DEFINE_float("tolerance", 0.2, "Selection: validation error within this many points of "
                   "the dense network's.")
flags.DEFINE_list("overrides", [], "Extra config overrides field=value (e.g. compress.iterations=2).")


def _config(**fields):
  c = config_files.load(FLAGS.experiment).get_config(FLAGS.variant)
  c.seed = FLAGS.seed
  c.progress_bar = False
  for item in FLAGS.overrides:
    k, v = item.split("=", 1)
    current = _get(c, k)
    fields[k] = v if current is None else type(current)(v)
  c.update_from_flattened_dict(fields)
  return c


def _get(c, dotted):
  for p in dotted.split("."):
    c = c[p]
  return c


def _run(name: str, **fields) -> dict:
  workdir = os.path.join(FLAGS.root, name)
  path = os.path.join(workdir, runner.RESULT_JSON)
  if not os.path.exists(path):
    start_wall, start_cpu = time.time(), time.process_time()
    runner.run(_config(**fields), workdir)
    logging.info("%s: %.0f s wall, %.0f s CPU", name, time.time() - start_wall,
                 time.process_time() - start_cpu)
    with open(os.path.join(workdir, "seconds.json"), "w") as f:
      json.dump({"wall": time.time() - start_wall, "cpu": time.process_time() - start_cpu}, f)
  with open(path) as f:
    result = json.load(f)
  result.pop("history", None)
  result["name"] = name
  sec = os.path.join(workdir, "seconds.json")
  if os.path.exists(sec):
    with open(sec) as f:
      result["seconds"] = json.load(f)
  return result


def _select(rows, dense_val, tol, key="weights_kept"):
  """The row with the smallest `key` whose validation error is within `tol` of dense (or None)."""
  ok = [r for r in rows if r["val_err"] <= dense_val + tol]
  return min(ok, key=lambda r: (r[key], r["val_err"])) if ok else None


def _verdict(selected, selected_macs) -> str:
  """Whether BayesNAS's selected points keep fewer weights and fewer MACs than the selected points
  of group lasso and L1-norm pruning (random pruning copies BayesNAS's per-layer counts, so it is
  a control of the choice of units, not a competitor in size)."""
  b, bm = selected.get("bayesnas"), selected_macs.get("bayesnas")
  if b is None or bm is None:
    return "BayesNAS has no point within the tolerance: target not met."
  lines = []
  met = True
  for m in ("group_lasso", "l1_filter"):
    o, om = selected.get(m), selected_macs.get(m)
    if o is None:
      lines.append(f"{m}: no point within the tolerance")
      continue
    fw, fm = b["weights_kept"] < o["weights_kept"], bm["macs_kept"] < om["macs_kept"]
    met &= fw and fm
    lines.append(f"{m}: weights {b['weights_kept']:,} vs {o['weights_kept']:,} "
                 f"({'fewer' if fw else 'NOT fewer'}), MACs {bm['macs_kept']:,} vs "
                 f"{om['macs_kept']:,} ({'fewer' if fm else 'NOT fewer'})")
  head = "target met" if met else "target NOT met"
  return f"Verdict (selection on validation error): {head}.\n\n" + "\n".join(
      f"* {l}" for l in lines) + "\n"


_NETWORKS = {"lenet5": "LeNet-5-Caffe", "lenet300_100": "LeNet-300-100",
             "lenet500_300": "LeNet-500-300", "vgg_like": "VGG-like"}
_DATA = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def _title(c) -> str:
  """The network and the data of config `c`, for the plot."""
  net = _NETWORKS.get(c.model.name, c.model.name)
  if c.model.name == "vgg_like" and float(c.model.scale) != 1.0:
    scale = float(c.model.scale)
    net += f" (width {f'1/{round(1 / scale)}' if (1 / scale).is_integer() else f'{scale:g}'})"
  data = _DATA.get(c.data.name, c.data.name)
  if c.data.source == "idx_t10k_split":
    return (f"{net}, {data} t10k split {c.data.split_train:,} / {c.data.split_test:,} "
            "(not comparable with 60k-split results)")
  return f"{net}, {data} ({c.data.num_val:,} training images held out for validation)"


def _plot(rows, dense, path_base, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  styles = {"bayesnas": "o-", "group_lasso": "s-", "l1_filter": "^-", "random": "x"}
  for ax, key, label in ((axes[0], "weights_kept", "kept weights"),
                         (axes[1], "macs_kept", "kept MACs")):
    for method, style in styles.items():
      # A collapsed run (a whole layer pruned) keeps nothing: no point on a log axis.
      pts = sorted((r[key], r["test_err"]) for r in rows
                   if r["method"] == method and r[key] > 0)
      if pts:
        ax.plot(*zip(*pts), style, label=method)
    ax.axhline(dense["test_err"], color="grey", ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    errs = [r["test_err"] for r in rows if r[key] > 0]
    # From 0 for small errors (MNIST); from a little below the best run otherwise (CIFAR-10).
    bottom = 0.0 if dense["test_err"] < 10 else max(0.0, min(errs + [dense["test_err"]]) - 3)
    ax.set_ylim(bottom, min(max(10.0, 3 * dense["test_err"]), max(errs + [5.0]) + 0.5))
    ax.set_xlabel(label + " (log)")
    ax.set_ylabel("test error (%)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  for ext in ("png", "svg"):
    fig.savefig(f"{path_base}.{ext}", dpi=120)


def _table(rows, dense, selected, selected_macs) -> str:
  head = ("| method | setting | kept structure | val err | test err | weights kept | CR_w | "
          "MACs kept | MAC ratio | CPU s |\n|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in [dense] + rows:
    setting = (f"lambda {r['lambda']:g}" if r["method"] in ("bayesnas", "group_lasso") else
               f"r {r['ratio']:g}" if r["method"] == "l1_filter" else "")
    cpu = r.get("seconds", {}).get("cpu")
    lines.append(f"| {r['method']} | {setting} | {r['kept_structure']} | {r['val_err']:.2f} | "
                 f"{r['test_err']:.2f} | {r['weights_kept']:,} | {r['cr_w']:.1f} | "
                 f"{r['macs_kept']:,} | {r['macs_ratio']:.2f} | "
                 f"{'' if cpu is None else f'{cpu:.0f}'} |")
  sel = []
  for by, picked in (("weights", selected), ("MACs", selected_macs)):
    sel += ["", f"Selected per method{'' if by == 'weights' else ' by MACs'} (smallest kept {by} "
            f"with val error <= dense {dense['val_err']:.2f} + {FLAGS.tolerance}):", "",
            "| method | kept structure | test err | weights kept | CR_w | MACs kept | MAC ratio |",
            "|---|---|---|---|---|---|---|"]
    for method, r in picked.items():
      if r is None:
        sel.append(f"| {method} | none within tolerance | | | | | |")
      else:
        sel.append(f"| {method} | {r['kept_structure']} | {r['test_err']:.2f} | "
                   f"{r['weights_kept']:,} | {r['cr_w']:.1f} | {r['macs_kept']:,} | "
                   f"{r['macs_ratio']:.2f} |")
  return (head + "\n".join(lines) + "\n" + "\n".join(sel) + "\n\n"
          + _verdict(selected, selected_macs))


def main(argv):
  del argv
  os.makedirs(FLAGS.root, exist_ok=True)
  dense = _run("dense", method="dense")
  pretrained = os.path.join(FLAGS.root, "dense", "pretrained")
  rows = []
  for lam in FLAGS.bayes_lams:
    rows.append(_run(f"bayesnas_lam{lam}", method="bayesnas", pretrained_dir=pretrained,
                     **{"compress.lam": float(lam),
                        "compress.cost_weighting": FLAGS.cost_weighting}))
  for lam in FLAGS.gl_lams:
    rows.append(_run(f"group_lasso_lam{lam}", method="group_lasso", pretrained_dir=pretrained,
                     **{"compress.lam": float(lam),
                        "compress.cost_weighting": FLAGS.cost_weighting}))
  for r in FLAGS.ratios:
    rows.append(_run(f"l1_filter_r{r}", method="l1_filter", pretrained_dir=pretrained,
                     **{"baseline.ratio": float(r)}))
  selected = {m: _select([r for r in rows if r["method"] == m], dense["val_err"], FLAGS.tolerance)
              for m in ("bayesnas", "group_lasso", "l1_filter")}
  if selected["bayesnas"] is not None:
    rows.append(_run("random_like_bayesnas", method="random", pretrained_dir=pretrained,
                     **{"baseline.kept": selected["bayesnas"]["kept_structure"]}))
    selected["random"] = _select([r for r in rows if r["method"] == "random"], dense["val_err"],
                                 FLAGS.tolerance)
  selected_macs = {m: _select([r for r in rows if r["method"] == m], dense["val_err"],
                              FLAGS.tolerance, "macs_kept") for m in selected}
  with open(os.path.join(FLAGS.root, "results.json"), "w") as f:
    json.dump({"dense": dense, "runs": rows, "selected": selected,
               "selected_by_macs": selected_macs}, f, indent=2)
  table = _table(rows, dense, selected, selected_macs)
  with open(os.path.join(FLAGS.root, "table.md"), "w") as f:
    f.write(table)
  c = _config()
  _plot(rows, dense, os.path.join(FLAGS.root, f"compress_{c.model.name}"), _title(c))
  total = sum(r.get("seconds", {}).get("cpu", 0.0) for r in [dense] + rows)
  print(table)
  print(f"total CPU seconds of the runs: {total:.0f}")


if __name__ == "__main__":
  app.run(main)
