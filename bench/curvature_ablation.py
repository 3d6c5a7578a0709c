"""Does the curvature change BayesNAS's decision? Replays each prior update of a finished search.

For every outer iteration of a search run directory (``<workdir>/iterations/tNN/prior.npz`` holds
what the update started from: ``update_inputs/{gamma_prev,switches_prev,h}``), this script calls
`bnas_jax.bayes.update` with the run's settings three times:

* ``replay``: the stored curvature h (must reproduce the run's own alive mask and gamma: a check
  that the replay is faithful);
* ``median H``: h replaced, per cell type and switch kind (origin / op), by its median over the
  live switches, so that the update sees the switch sizes but no per-switch curvature;
* ``h x 1000``: h scaled by 1000 (the regime gamma * H >> 1, where gamma follows the switch size).

and prints, per iteration and variant: the live groups, how many groups are pruned differently
from the replay, the Spearman correlation of the op-group gammas with the replay's, and the cell
the variant derives (nb201: the arch string and its NAS-Bench-201 validation accuracy when the
table is there; bayesnas / darts: the surviving ops per cell type).
If the curvature decides, ``median H`` prunes and derives differently.

Usage:
  python bench/curvature_ablation.py --workdir runs/nb201_cifar10
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax.numpy as jnp
import numpy as np

from bnas_jax import bayes
from bnas_jax import genotype as genotype_lib
from bnas_jax import nb201
from bnas_jax.search_space import spaces


def _load(path: str) -> dict[str, dict[str, np.ndarray]]:
  out: dict[str, dict[str, np.ndarray]] = {}
  with np.load(path) as z:
    for key in z.files:
      *field, tau = key.split("/")
      out.setdefault("/".join(field), {})[tau] = z[key]
  return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1]) if a.size > 1 else 1.0


def _median_h(h, alive):
  out = {}
  for tau, x in h.items():
    x = np.array(x, np.float64)
    a = np.broadcast_to(alive[tau][None], x.shape)
    for sl in (slice(0, 1), slice(1, None)):
      live = a[..., sl]
      if live.any():
        x[..., sl] = np.median(x[..., sl][live])
    out[tau] = x
  return out


def _cell(space, alive, scores, table=None) -> str:
  if space.family == "nb201":
    arch = genotype_lib.derive_nb201(space, scores, alive)
    return arch if table is None else f"{arch} ({table.accuracy(arch):.2f} % NB201 valid)"
  g = genotype_lib.derive(space, alive, scores)
  return "; ".join(f"{t}: {len(getattr(g, t))} ops" + " " + " ".join(
      sorted(f"{op}({src}->{dst})" for dst, src, op in getattr(g, t))) for t in space.cells)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a search run directory")
  args = ap.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = json.load(f)
  space = spaces.get_space(config["space"])
  b = config["bayes"]
  kw = dict(lambda_origin=b["lambda_origin"], lambda_op=b["lambda_op"],
            prune_threshold=b["prune_threshold"], prune_mode=b["prune_mode"],
            eps_omega=b["eps_omega"], fidelity=b["fidelity"], cells=space.cells)
  table = None
  if space.family == "nb201":
    try:
      table = nb201.load_table(config["nb201"]["table"], config["nb201"]["dataset"])
    except (FileNotFoundError, ValueError):
      pass
  files = sorted(glob.glob(os.path.join(args.workdir, "iterations", "t*", "prior.npz")))
  if not files:
    raise SystemExit(f"no iterations/tNN/prior.npz under {args.workdir}: run a search first")
  for path in files:
    d = _load(path)
    if "update_inputs/h" not in d:
      raise SystemExit(f"{path} has no update_inputs: rerun the search with this version")
    g_prev = {t: jnp.asarray(v) for t, v in d["update_inputs/gamma_prev"].items()}
    s_prev = {t: jnp.asarray(v) for t, v in d["update_inputs/switches_prev"].items()}
    h = d["update_inputs/h"]
    alive_prev = {t: np.asarray(v).max(axis=0) > 0 for t, v in d["update_inputs/gamma_prev"].items()}
    state = bayes.init(s_prev, alive={t: jnp.asarray(a) for t, a in alive_prev.items()})
    state = state._replace(gamma=g_prev)
    variants = {"replay": h, "median H": _median_h(h, alive_prev),
                "h x 1000": {t: 1000.0 * v for t, v in h.items()}}
    print(f"== {os.path.relpath(path, args.workdir)}")
    ref = None
    for name, hv in variants.items():
      new = bayes.update(state, s_prev, {t: jnp.asarray(v) for t, v in hv.items()}, **kw)
      alive = {t: np.asarray(a) for t, a in new.alive.items()}
      scores = {t: np.asarray(v) for t, v in new.score.items()}
      if ref is None:
        ref = (alive, scores)
        for t in alive:
          if not np.array_equal(alive[t], d["alive"][t]):
            raise SystemExit(f"replay of {path} does not reproduce the run's alive mask ({t})")
      changed = sum(int((alive[t] != ref[0][t]).sum()) for t in alive)
      rho = np.mean([_spearman(scores[t][:, 1:].ravel(), ref[1][t][:, 1:].ravel())
                     for t in alive])
      live = sum(int(a.sum()) for a in alive.values())
      total = sum(a.size for a in alive.values())
      print(f"  {name:9s} live {live:3d}/{total}  pruned differently {changed:3d}  "
            f"op-gamma Spearman vs replay {rho:+.3f}  cell {_cell(space, alive, scores, table)}")


if __name__ == "__main__":
  main()
