"""Export of a physically smaller network (compression spec 2.4) and its metrics (spec 4).

`export` folds the switches into the weights (exact for any sign of s), slices every tensor by the
kept unit sets (spec 2.3, after `groups.propagate`) and returns the `Arch` of the smaller dense
network (per-layer widths, plus the kept ``fc1`` input indices) with its variables. The exported
network holds no masks and no switches; its logits equal those of the masked, switched network
(tests/test_compression_export.py checks this to 1e-6 and the counts against the widths).

`save` writes ``structure.json`` (widths, kept indices, metrics) and ``variables.npz``; `load`
reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.compression import groups
from bnas_jax.compression import networks

STRUCTURE_JSON = "structure.json"
VARIABLES_NPZ = "variables.npz"


def _np(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def export(arch: networks.Arch, variables: Mapping[str, Any],
           switches: Mapping[str, Any] | None, masks: Mapping[str, np.ndarray] | None = None
           ) -> tuple[networks.Arch, dict[str, Any]]:
  """The smaller dense network equal to the masked, switched one.

  Args:
    arch: the full network (``input_index`` None).
    variables: ``{'params', 'batch_stats'?}`` of `arch`.
    switches: the switch tree ``{tau: f32[1, E, K]}`` (`groups.switch_shapes`), or None (all 1).
    masks: unit masks ``{name: bool[U]}`` (`groups.unit_masks`); None = the units whose switch is
      non-zero. Propagated (`groups.propagate`) before slicing; a switch of a dead unit is ignored.

  Returns:
    ``(exported_arch, exported_variables)`` in eval form (batch norm with running statistics).

  Raises:
    groups.LayerCollapsedError: a layer lost every unit.
    ValueError: switch or mask shapes that do not fit `arch`.
  """
  sw = {k: np.asarray(v, np.float32) for k, v in groups.unit_switches(
      arch, switches if switches is not None else groups.init_switches(arch)).items()}
  if masks is None:
    masks = {k: v != 0 for k, v in sw.items()}
  masks = groups.propagate(arch, masks)
  params = _np(dict(variables["params"]))
  stats = _np(dict(variables.get("batch_stats", {})))
  new_p, new_s = {}, {}

  def fold_and_slice(name: str, s: np.ndarray, keep_in: np.ndarray | slice, keep_out: np.ndarray):
    k = params[name]["kernel"] * s  # output switch folded into the kernel (no BN) ...
    bn = f"bn_{name}"
    if bn in params:  # ... or into the BN affine (eval form): gamma' = s gamma, beta' = s beta
      k = params[name]["kernel"]
      new_p[bn] = {"scale": (params[bn]["scale"] * s)[keep_out],
                   "bias": (params[bn]["bias"] * s)[keep_out]}
      new_s[bn] = {key: v[keep_out] for key, v in stats[bn].items()}
    k = k[..., keep_in, :][..., keep_out]
    entry = {"kernel": k}
    if "bias" in params[name]:
      b = params[name]["bias"] * (1.0 if bn in params else s)
      entry["bias"] = b[keep_out]
    new_p[name] = entry

  keep_in: Any = slice(None)
  convs = []
  for i, layer in enumerate(arch.convs, 1):
    name = f"conv{i}"
    keep = np.flatnonzero(masks[name])
    fold_and_slice(name, sw[name], keep_in, keep)
    convs.append(dataclasses.replace(layer, features=int(keep.size)))
    keep_in = keep

  # fc1 inputs: kept flatten indices (original NHWC layout p * C + c) -> the exported layout.
  p = groups.flatten_positions(arch)
  input_index = None
  fc1 = params["fc1"]["kernel"]
  if "fc1_in" in masks:
    rows = np.flatnonzero(masks["fc1_in"])
    r = sw.get("fc1_in", np.ones(arch.flatten_size, np.float32))
    fc1 = fc1 * r[:, None]
    if arch.convs:
      c_full = arch.convs[-1].features
      kept_c = np.flatnonzero(masks[f"conv{len(arch.convs)}"])
      new_pos = -np.ones(c_full, np.int64)
      new_pos[kept_c] = np.arange(kept_c.size)
      idx = (rows // c_full) * kept_c.size + new_pos[rows % c_full]
      input_index = None if idx.size == p * kept_c.size else tuple(int(i) for i in idx)
    else:
      input_index = None if rows.size == arch.flatten_size else tuple(int(i) for i in rows)
  else:  # flatten of one position: fc1's inputs are the last conv's channels
    rows = keep_in if arch.convs else np.arange(arch.flatten_size)
  fc1 = fc1[rows]

  dense = []
  for j, width in enumerate(arch.dense, 1):
    name = f"fc{j}"
    keep = np.flatnonzero(masks[name])
    if j == 1:
      params_j = dict(params[name], kernel=fc1)
      params[name] = params_j
      fold_and_slice(name, sw[name], slice(None), keep)
    else:
      fold_and_slice(name, sw[name], keep_in, keep)
    dense.append(int(keep.size))
    keep_in = keep
  last = f"fc{len(arch.dense) + 1}"
  k = params[last]["kernel"] if arch.dense else fc1
  new_p[last] = {"kernel": k[keep_in] if arch.dense else k, "bias": params[last]["bias"]}

  new_arch = dataclasses.replace(arch, convs=tuple(convs), dense=tuple(dense),
                                 input_index=input_index)
  out = {"params": new_p}
  if new_s:
    out["batch_stats"] = new_s
  _check_layout(new_arch, out)
  return new_arch, jax.tree_util.tree_map(jnp.asarray, out)


def _check_layout(arch: networks.Arch, variables: Mapping[str, Any]) -> None:
  """The sliced tensors have exactly the shapes the exported `Arch` builds (spec 2.4 step 3)."""
  want = jax.eval_shape(lambda: networks.init_variables(arch, jax.random.key(0)))
  got = jax.tree_util.tree_map(np.shape, dict(variables))
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), dict(want))
  if got != want:
    raise AssertionError(f"exported tensors {got} do not match the exported arch {want}")


def metrics(dense_arch: networks.Arch, kept_arch: networks.Arch) -> dict[str, Any]:
  """Spec 4.2-4.5 counts: structure, weights / params / MACs dense and kept, and their ratios."""
  d, k = networks.count(dense_arch), networks.count(kept_arch)
  return {
      "kept_structure": networks.structure(kept_arch),
      "dense_structure": networks.structure(dense_arch),
      "weights_dense": d["weights"], "weights_kept": k["weights"],
      "cr_w": d["weights"] / k["weights"],
      "params_dense": d["params"], "params_kept": k["params"], "cr_all": d["params"] / k["params"],
      "macs_dense": d["macs"], "macs_kept": k["macs"], "macs_ratio": d["macs"] / k["macs"],
      "macs_reduction_percent": 100.0 * (1.0 - k["macs"] / d["macs"]),
      "flops_2x_macs_kept": 2 * k["macs"],
  }


def arch_to_json(arch: networks.Arch) -> dict[str, Any]:
  return dataclasses.asdict(arch)


def arch_from_json(d: Mapping[str, Any]) -> networks.Arch:
  d = dict(d)
  d["convs"] = tuple(networks.ConvLayer(**c) for c in d["convs"])
  d["input_shape"] = tuple(d["input_shape"])
  d["dense"] = tuple(d["dense"])
  if d.get("input_index") is not None:
    d["input_index"] = tuple(d["input_index"])
  return networks.Arch(**d)


def save(directory: str, arch: networks.Arch, variables: Mapping[str, Any],
         extra: Mapping[str, Any] | None = None) -> str:
  """Writes ``structure.json`` (the arch, widths, kept indices and `extra` metrics) and
  ``variables.npz`` (``'params/conv1/kernel'``-style keys) into `directory`; returns the json path."""
  os.makedirs(directory, exist_ok=True)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
  np.savez(os.path.join(directory, VARIABLES_NPZ), **flat)
  doc = {"arch": arch_to_json(arch), "structure": networks.structure(arch),
         "counts": networks.count(arch), **dict(extra or {})}
  path = os.path.join(directory, STRUCTURE_JSON)
  with open(path, "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True, default=float)
  return path


def load(directory: str) -> tuple[networks.Arch, dict[str, Any]]:
  """Reads what `save` wrote: ``(arch, variables)``.

  Raises:
    FileNotFoundError: naming the missing file.
  """
  for name in (STRUCTURE_JSON, VARIABLES_NPZ):
    if not os.path.exists(os.path.join(directory, name)):
      raise FileNotFoundError(f"{directory} has no {name}; it is not an exported network folder")
  with open(os.path.join(directory, STRUCTURE_JSON)) as f:
    arch = arch_from_json(json.load(f)["arch"])
  variables: dict[str, Any] = {}
  with np.load(os.path.join(directory, VARIABLES_NPZ)) as z:
    for key in z.files:
      node = variables
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jnp.asarray(z[key])
  return arch, variables
