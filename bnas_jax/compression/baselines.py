"""Baselines that prune the same groups without the HARD prior (compression spec 7.2).

* B1, plain group lasso on the switches (omega = 1, no curvature, no gamma): ``method=
  'group_lasso'`` of the runner, the same step functions as BayesNAS (`train.prior_step` with
  ``reweight=False``);
* B2, L1-norm filter / neuron pruning (Li et al.): `l1_masks` scores every group of the full
  network from the pretrained weights and keeps the top ``1 - ratio`` per layer (at least one);
  the runner then exports and fine-tunes;
* B3, random structure: `random_masks` keeps the per-layer counts of another result (``'5-10-76-16'``
  notation, `parse_structure`) with units drawn uniformly at random.

Group scores of B2 (spec 7.2): conv filter ``j``: ``sum |W[:, :, :, j]|``; hidden FC neuron
``j``: ``sum |W[:, j]|`` (its incoming weights); an ``fc1`` input unit ``i`` (pixel or flattened
conv unit): ``sum |W[i, :]|`` (its outgoing row).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bnas_jax.compression import groups
from bnas_jax.compression import networks


def _keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
  keep = int(min(max(keep, 1), scores.size))
  order = np.argsort(-scores, kind="stable")
  mask = np.zeros(scores.size, bool)
  mask[order[:keep]] = True
  return mask


def l1_masks(arch: networks.Arch, variables: Mapping[str, Any], ratio: float
             ) -> dict[str, np.ndarray]:
  """Unit masks keeping ``ceil((1 - ratio) U)`` units of each layer by L1 norm (B2).

  Args:
    arch: the full network.
    variables: its ``{'params', ...}``.
    ratio: fraction of each layer's units removed, in [0, 1).

  Returns:
    ``{name: bool[U]}`` (`groups.unit_masks` names), propagated (`groups.propagate`).

  Raises:
    ValueError: a ratio outside [0, 1).
  """
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"ratio must be in [0, 1), got {ratio}")
  params = variables["params"]
  names = groups.full_masks(arch)
  out = {}
  for name in names:
    if name == "fc1_in":
      w = np.asarray(params["fc1"]["kernel"])
      scores = np.abs(w).sum(axis=1)
    else:
      w = np.asarray(params[name]["kernel"])
      scores = np.abs(w).reshape(-1, w.shape[-1]).sum(axis=0)
    out[name] = _keep_top(scores, int(np.ceil((1.0 - ratio) * scores.size)))
  return groups.propagate(arch, out)


def parse_structure(arch: networks.Arch, text: str) -> dict[str, int]:
  """Per-layer kept counts from the spec 4.2 notation (`networks.structure`).

  Args:
    arch: the full network.
    text: e.g. ``'5-10-76-16'`` (LeNet-5) or ``'245-160-55-10'`` (an MLP, logits last).

  Returns:
    ``{name: count}`` for the names of `groups.full_masks`.

  Raises:
    ValueError: the wrong number of fields, or a count outside ``[1, full width]``.
  """
  full = networks.structure(arch).split("-")
  try:
    parts = [int(p) for p in str(text).split("-")]
  except ValueError:
    parts = []
  if len(parts) != len(full):
    raise ValueError(f"{text!r} must have {len(full)} dash-separated counts like the full "
                     f"structure {'-'.join(full)}")
  names = [f"conv{i}" for i in range(1, len(arch.convs) + 1)] + ["fc1_in"] + [
      f"fc{j}" for j in range(1, len(arch.dense) + 1)]
  out = {}
  for name, n, f in zip(names, parts, full):
    if not 1 <= n <= int(f):
      raise ValueError(f"{text!r}: {name} keeps {n} of {f} units; each count must be in [1, {f}]")
    out[name] = n
  if not arch.convs and parts[-1] != arch.num_classes:
    raise ValueError(f"{text!r}: the last count is the {arch.num_classes} logits")
  if groups.flatten_positions(arch) == 1:  # VGG-like: fc1 inputs = last conv channels
    out.pop("fc1_in")
  return out


def random_masks(arch: networks.Arch, counts: Mapping[str, int], seed: int
                 ) -> dict[str, np.ndarray]:
  """Unit masks with ``counts[name]`` units per layer chosen uniformly at random (B3).

  For LeNet-5 the ``fc1`` inputs are drawn among the positions of the kept conv channels (a
  draw elsewhere would be dead at once). Propagated (`groups.propagate`).
  """
  rng = np.random.default_rng(seed)
  full = groups.full_masks(arch)
  out = {}
  for name in full:
    if name == "fc1_in":
      continue
    mask = np.zeros(full[name].size, bool)
    mask[rng.choice(full[name].size, counts[name], replace=False)] = True
    out[name] = mask
  if "fc1_in" in full:
    if arch.convs:
      c = arch.convs[-1].features
      allowed = np.flatnonzero(np.tile(out[f"conv{len(arch.convs)}"], full["fc1_in"].size // c))
    else:
      allowed = np.arange(full["fc1_in"].size)
    mask = np.zeros(full["fc1_in"].size, bool)
    mask[rng.choice(allowed, min(counts["fc1_in"], allowed.size), replace=False)] = True
    out["fc1_in"] = mask
  return groups.propagate(arch, out)
