"""What a search shows and writes after a prior update: one host view, computed once, handed to the
evaluation record, the genotype files, the summary and the result.

`HostView.create` fetches the prior state and the switches from the device once and derives the
genotype (`genotype.derive`, with the group scores of `bayes.HardPriorState.score`), the group
gammas and, in the nb201 space, the NAS-Bench-201 arch string and its table accuracy.
`write_outputs` writes a view into a folder (the run directory or ``iterations/tNN``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from bnas_jax import bayes
from bnas_jax import run_lib


@dataclasses.dataclass(frozen=True)
class HostView:
  """The search's decision state on the host, after one prior update (or at start / resume).

  Attributes:
    space: the `spaces.SearchSpace`.
    prior: the `bayes.HardPriorState` as numpy arrays.
    switches: ``{tau: f32[n, E, K]}`` (numpy).
    alive: ``{tau: bool[E, K]}`` group mask.
    scores: ``{tau: f32[E, K]}`` group scores (`bayes.HardPriorState.score`).
    gamma: ``{tau: f32[E, K]}`` group prior variances (`bayes.group_gamma`).
    max_ops: ``genotype.max_ops``.
    nb201_table: an `nb201.NB201Table` or None (no look-up).
  """
  space: Any
  prior: bayes.HardPriorState
  switches: dict[str, np.ndarray]
  alive: dict[str, np.ndarray]
  scores: dict[str, np.ndarray]
  gamma: dict[str, np.ndarray]
  max_ops: int = 0
  nb201_table: Any = None

  @classmethod
  def create(cls, space, prior: bayes.HardPriorState, switches: Mapping[str, Any], *,
             max_ops: int = 0, nb201_table=None) -> "HostView":
    """Fetches `prior` and `switches` from the device once; everything else derives from these
    host copies."""
    prior, switches = jax.device_get((prior, dict(switches)))
    prior = jax.tree.map(np.asarray, prior)
    return cls(space, prior, {t: np.asarray(s) for t, s in switches.items()},
               {t: np.asarray(a, bool) for t, a in prior.alive.items()},
               {t: np.asarray(g) for t, g in prior.score.items()},
               {t: np.asarray(g) for t, g in bayes.group_gamma(prior).items()},
               int(max_ops), nb201_table)

  @functools.cached_property
  def genotype(self):
    """The derived `bnas_jax.genotype.Genotype` (`genotype.derive`, capped by `max_ops`)."""
    from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    return genotype_lib.derive(self.space, self.alive, self.scores, max_ops=self.max_ops)

  @functools.cached_property
  def nb201(self) -> dict[str, Any] | None:
    """``{'nb201_arch': str, 'nb201_accuracy': float (when the table has it)}`` in the nb201
    space (one op per edge by score), else None."""
    if self.space.name != "nb201":
      return None
    from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
    arch = genotype_lib.derive_nb201(self.space, self.scores, self.alive)
    out = {"nb201_arch": arch}
    if self.nb201_table is not None:
      try:
        out["nb201_accuracy"] = self.nb201_table.accuracy(arch)
        logging.info("NAS-Bench-201 %s accuracy of %s: %.2f%%", self.nb201_table.dataset, arch,
                     out["nb201_accuracy"])
      except KeyError as e:
        logging.warning("%s", e)
    return out


def write_outputs(folder: str, view: HostView,
                  update_inputs: Mapping[str, Any] | None = None) -> None:
  """genotype.json, cell pictures, DARTS / NB201 exports and prior.npz of `view` into `folder`.

  `update_inputs` (``{'gamma_prev', 'switches_prev', 'h'}``, each ``{tau: array}``): what the
  prior update started from, stored as ``update_inputs/<name>/<tau>`` so that the update can be
  replayed offline (``bench/curvature_ablation.py``).
  """
  from bnas_jax import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  view.genotype.save(os.path.join(folder, "genotype.json"))
  genotype_lib.plot(view.genotype, os.path.join(folder, "genotype"))
  space = view.space
  survivors = genotype_lib.derive(space, view.alive, view.scores)
  if survivors != view.genotype:  # genotype.max_ops capped the cell: keep the uncapped one too
    survivors.save(os.path.join(folder, "genotype_survivors.json"))
  if space.name == "darts":
    # DARTS-style export: top-2 input edges per node, one op each (genotype.derive_darts).
    darts_cell = genotype_lib.derive_darts(space, view.scores, view.alive)
    darts_cell.save(os.path.join(folder, "genotype_darts.json"))
    d = genotype_lib.to_darts(darts_cell)
    with open(os.path.join(folder, "genotype_darts.txt"), "w") as f:  # pastes into DARTS code
      f.write(f"Genotype(normal={[tuple(p) for p in d.normal]!r}, "
              f"normal_concat={list(d.normal_concat)!r}, "
              f"reduce={[tuple(p) for p in d.reduce]!r}, "
              f"reduce_concat={list(d.reduce_concat)!r})\n")
    genotype_lib.plot(darts_cell, os.path.join(folder, "genotype_darts"))
  if view.nb201 is not None:
    with open(os.path.join(folder, "nb201_arch.txt"), "w") as f:
      f.write(view.nb201["nb201_arch"] + "\n")
  arrays = {}
  for field in ("gamma", "omega", "posterior_variance", "curvature", "alive", "score"):
    for t, v in getattr(view.prior, field).items():
      arrays[f"{field}/{t}"] = np.asarray(v)
  for t, v in view.switches.items():
    arrays[f"switches/{t}"] = v
  for name, tree in jax.device_get(dict(update_inputs or {})).items():
    for t, v in tree.items():
      arrays[f"update_inputs/{name}/{t}"] = np.asarray(v)
  np.savez(os.path.join(folder, "prior.npz"), **arrays)


def iteration_record(iteration: int, global_step: int, evaluation: Mapping[str, float],
                     view: HostView, summaries: Mapping[str, float],
                     calibration: Mapping[str, float], seconds: float) -> dict[str, Any]:
  """The history entry of outer iteration `iteration` (JSON values)."""
  record = {"iteration": iteration, "global_step": global_step, **evaluation,
            "live_groups": int(summaries["live_groups"]),
            "live_switches": int(sum(v for k, v in summaries.items()
                                     if k.endswith("/live_switches"))),
            "curvature_and_update_s": seconds, "calibration": dict(calibration),
            "genotype": view.genotype.to_dict()}
  record.update(view.nb201 or {})
  return record


def log_iteration(record: Mapping[str, Any], summaries: Mapping[str, float],
                  calibration: Mapping[str, float]) -> None:
  """One log line: val accuracy, live groups, the prior's medians and the gamma*H medians."""
  logging.info("iteration %d: val accuracy %.4f, %d live groups; prior: %s", record["iteration"],
               record["val_accuracy"], summaries["live_groups"],
               ", ".join(f"{k}={v:.4g}" for k, v in sorted(summaries.items())
                         if "median" in k or "live" in k)
               + "; gamma*H medians: " + ", ".join(f"{k.replace('/gammaH_q50', '')}={v:.3g}"
                                                   for k, v in calibration.items() if "q50" in k))


def write_summary(workdir: str, view: HostView, *, global_step: int, val_accuracy: float | None,
                  history: list[dict[str, Any]]) -> dict[str, Any]:
  """Writes ``<workdir>/summary.json`` of a finished search; returns it."""
  summary = {"completed": True, "global_step": global_step, "val_accuracy": val_accuracy,
             "history": history, "genotype": view.genotype.to_dict(), **(view.nb201 or {})}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=run_lib.to_json_value)
  return summary
