"""Groups, switches and the hierarchy of network compression (compression spec 2.1-2.3, 3.1, 3.3).

The HARD prior of `bnas_jax.bayes` works on ``{tau: f32[n, E, K]}`` switch trees whose column 0
is an "origin" (parent) switch and columns 1..K-1 its children. Compression uses it as is, with
``n = 1`` (no cells share a group, spec 3.1) and one ``tau`` per layer:

* ``'conv{i}'`` ``[1, C_i, 1]``: one output switch per conv channel (filter);
* the last conv before a flatten of ``P > 1`` positions (LeNet-5: ``P = 16``) is a parent:
  ``[1, C, 1 + P]``, column 0 the channel switch, column ``1 + p`` the input switch of ``fc1``
  input unit ``(p, c)`` (flattened index ``p C + c``, NHWC). `bnas_jax.bayes.update` then applies
  the hierarchy of spec 3.3 (a child's gamma in series with its channel's, a dead channel kills its
  children, a channel whose children are all dead dies: rule R1). With ``P = 1`` (VGG-like) the
  channel switch is also the ``fc1`` input switch (one switch, spec 3.3);
* ``'fc1_in'`` ``[1, F, 1]`` for an MLP: one input switch per pixel;
* ``'fc{j}'`` ``[1, W_j, 1]``: one output switch per hidden FC neuron.

Group counts (spec 2.1): LeNet-300-100 1,184; LeNet-500-300 1,584; LeNet-5 1,370; VGG-like 4,736.

`unit_switches` maps a switch tree (optionally with a leading per-example axis ``B``) to the
``{name: f32[U] | f32[B, U]}`` form `networks.CompressNet` applies; `unit_masks` does the same for
the prior's ``alive`` tree. `propagate` enforces the structural rules R1-R3 of spec 2.3 on unit
masks that come from elsewhere (the baselines).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.compression import networks

Array = jax.Array


class LayerCollapsedError(ValueError):
  """Every unit of a layer is pruned: the network is a constant function and cannot be exported.

  The message names the layer; the fix is a weaker sparsity strength.
  """


def flatten_positions(arch: networks.Arch) -> int:
  """Spatial positions ``P`` of the map flattened into ``fc1`` (0 for an MLP)."""
  if not arch.convs:
    return 0
  h, w, _ = arch.flatten_shape()
  return h * w


def _check_full(arch: networks.Arch) -> None:
  if arch.input_index is not None:
    raise ValueError(f"{arch.name}: switches and masks are defined on the full network, not on an "
                     "exported one (input_index is set); build the switch network with "
                     "networks.get_arch")


def switch_shapes(arch: networks.Arch) -> dict[str, tuple[int, int, int]]:
  """``{tau: (1, E, K)}`` of the switch tree of `arch` (module docstring)."""
  _check_full(arch)
  shapes = {}
  p = flatten_positions(arch)
  for i, layer in enumerate(arch.convs, 1):
    last = i == len(arch.convs)
    shapes[f"conv{i}"] = (1, layer.features, 1 + p if last and p > 1 else 1)
  if not arch.convs:
    shapes["fc1_in"] = (1, arch.flatten_size, 1)
  for j, width in enumerate(arch.dense, 1):
    shapes[f"fc{j}"] = (1, width, 1)
  return shapes


def num_groups(arch: networks.Arch) -> int:
  """Number of switch groups (spec 2.1 table)."""
  return sum(e * k for _, e, k in switch_shapes(arch).values())


def init_switches(arch: networks.Arch, value: float = 1.0) -> dict[str, Array]:
  """The switch tree, every switch at `value` (spec 3.2 step 0: 1.0), f32."""
  return {tau: jnp.full(shape, value, jnp.float32) for tau, shape in switch_shapes(arch).items()}


def unit_switches(arch: networks.Arch, switches: Mapping[str, Array]) -> dict[str, Array]:
  """``{name: f32[U] | f32[B, U]}`` for `networks.CompressNet` from a switch tree.

  Args:
    arch: the full network.
    switches: ``{tau: f32[1, E, K]}`` or, per example, ``{tau: f32[B, 1, E, K]}``.

  Returns:
    output switches ``'conv{i}'``, ``'fc{j}'`` and input switches ``'fc1_in'`` (LeNet-5: the
    children, flattened NHWC; MLP: the pixel switches).

  Raises:
    ValueError: switch names or shapes that do not match `switch_shapes`.
  """
  shapes = switch_shapes(arch)
  if set(switches) != set(shapes):
    raise ValueError(f"switches have groups {sorted(switches)}, {arch.name} needs {sorted(shapes)}")
  out = {}
  for tau, want in shapes.items():
    s = jnp.asarray(switches[tau])
    if s.shape[-3:] != want or s.ndim not in (3, 4):
      raise ValueError(f"switches[{tau!r}] has shape {s.shape}, expected {want} (or [B, *{want}] "
                       "per example)")
    s = s[..., 0, :, :]  # [(B,) E, K]
    if tau == "fc1_in":
      out[tau] = s[..., 0]
      continue
    out[tau] = s[..., 0]
    if want[2] > 1:  # parent: children are the fc1 inputs (p, c) -> p * C + c
      kids = s[..., 1:]  # [(B,) C, P]
      kids = jnp.swapaxes(kids, -1, -2)
      out["fc1_in"] = kids.reshape(kids.shape[:-2] + (-1,))
  return out


def unit_masks(arch: networks.Arch, alive: Mapping[str, Array]) -> dict[str, np.ndarray]:
  """``{name: bool[U]}`` unit masks from a group mask ``{tau: bool[E, K]}`` (e.g. the prior's
  ``alive``); the same names as `unit_switches`, plus ``'fc1_in'`` for every network with a flatten
  of more than one position or an MLP. For VGG-like (``P = 1``) the ``fc1`` inputs are the last
  conv's channels."""
  tree = {tau: jnp.asarray(a, jnp.float32)[None] for tau, a in alive.items()}
  return {k: np.asarray(v) > 0.5 for k, v in unit_switches(arch, tree).items()}


def group_alive(arch: networks.Arch, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `unit_masks`: ``{tau: bool[E, K]}`` from unit masks (after `propagate`)."""
  shapes = switch_shapes(arch)
  out = {}
  for tau, (_, e, k) in shapes.items():
    if tau == "fc1_in":
      out[tau] = np.asarray(masks["fc1_in"], bool).reshape(e, 1)
      continue
    col = np.asarray(masks[tau], bool).reshape(e, 1)
    if k > 1:
      kids = np.asarray(masks["fc1_in"], bool).reshape(k - 1, e).T
      col = np.concatenate([col, kids], axis=1)
    out[tau] = col
  return out


def full_masks(arch: networks.Arch) -> dict[str, np.ndarray]:
  """All-alive unit masks of `arch`."""
  return unit_masks(arch, {tau: np.ones(s[1:], bool) for tau, s in switch_shapes(arch).items()})


def propagate(arch: networks.Arch, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Structural deaths of spec 2.3, to a fixed point, on unit masks.

  * a dead channel of the last conv kills its ``fc1`` inputs (the input slice of its consumer);
  * R1: a last-conv channel whose ``fc1`` inputs are all dead is dead;
  * R2 reduces, in these networks (every unit of a layer reads every unit of the layer before), to
    a layer all of whose inputs are dead, i.e. a dead previous layer: the network is then a
    constant function, reported as `LayerCollapsedError`;
  * R3 (a weight survives only if both its ends survive) is what `export` slices.

  Args:
    arch: the full network.
    masks: ``{name: bool[U]}`` as `unit_masks`.

  Returns:
    the propagated masks (new arrays).

  Raises:
    LayerCollapsedError: a layer has no live unit, naming it.
  """
  m = {k: np.array(v, bool) for k, v in masks.items()}
  p = flatten_positions(arch)
  if arch.convs and p > 1:
    last = f"conv{len(arch.convs)}"
    c = arch.convs[-1].features
    kids = m["fc1_in"].reshape(p, c) & m[last][None, :]
    m[last] = m[last] & kids.any(axis=0)
    m["fc1_in"] = kids.reshape(-1)
  for name in [f"conv{i}" for i in range(1, len(arch.convs) + 1)] + ["fc1_in"] + [
      f"fc{j}" for j in range(1, len(arch.dense) + 1)]:
    if name in m and not m[name].any():
      raise LayerCollapsedError(f"{arch.name}: every unit of {name} is pruned, so the network is a "
                                "constant function; use a weaker sparsity strength (lambda)")
  return m


def kept_counts(arch: networks.Arch, masks: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Live units per layer name."""
  return {k: int(np.sum(v)) for k, v in masks.items()}


# -------------------------------------------------------------------------------------------------
# Group costs (cost-aware sparsity, ``compress.cost_weighting``).

COST_WEIGHTINGS = ("none", "macs", "weights")


def group_costs(arch: networks.Arch, kind: str) -> dict[str, np.ndarray]:
  """``{tau: f64[E, K]}``: the marginal cost of each group at the dense widths.

  The cost of a group is the partial derivative of `networks.count`'s ``kind`` (``'macs'`` or
  ``'weights'``) with respect to the width its switch controls, the other switch-controlled widths
  held fixed (the FLOPs-aware L0 / cost-weighted group-lasso convention): the unit's own incoming
  weights (times the output positions for MACs) plus the slice of its consumer that reads it.

  * ``conv{i}`` channel: ``k_i^2 C_{i-1}`` (x ``H_i W_i``) plus, when conv ``i + 1`` follows,
    ``k_{i+1}^2 C_{i+1}`` (x ``H_{i+1} W_{i+1}``); the last conv's channel with ``P = 1`` is also
    the ``fc1`` input, so it adds ``fc1``'s width; with ``P > 1`` (LeNet-5) its ``fc1`` inputs are
    its children and carry that cost themselves;
  * an ``fc1`` input (child column or ``'fc1_in'`` pixel): ``fc1``'s width;
  * ``fc{j}`` neuron: its fan-in plus the width of the next FC layer (or the logits).

  Biases and batch norm are not counted (the ``weights`` and ``macs`` of `networks.count`).

  Raises:
    ValueError: an unknown `kind`.
  """
  if kind not in ("macs", "weights"):
    raise ValueError(f"cost kind must be 'macs' or 'weights', got {kind!r}")
  _check_full(arch)
  shapes = switch_shapes(arch)
  macs = kind == "macs"
  outs = arch.conv_output_shapes()
  first_fc = arch.dense[0] if arch.dense else arch.num_classes
  p = flatten_positions(arch)
  out = {}
  c_in = arch.input_shape[2]
  for i, (layer, (ho, wo, _)) in enumerate(zip(arch.convs, outs)):
    own = layer.kernel ** 2 * c_in * (ho * wo if macs else 1)
    if i + 1 < len(arch.convs):
      nxt, (hn, wn, _) = arch.convs[i + 1], outs[i + 1]
      consumer = nxt.kernel ** 2 * nxt.features * (hn * wn if macs else 1)
    else:
      consumer = first_fc if p == 1 else 0
    _, e, k = shapes[f"conv{i + 1}"]
    cost = np.full((e, k), float(first_fc))  # children: fc1 inputs
    cost[:, 0] = own + consumer
    out[f"conv{i + 1}"] = cost
    c_in = layer.features
  if "fc1_in" in shapes:
    out["fc1_in"] = np.full(shapes["fc1_in"][1:], float(first_fc))
  fan_in = arch.fc_in
  widths = arch.dense + (arch.num_classes,)
  for j, width in enumerate(arch.dense, 1):
    out[f"fc{j}"] = np.full(shapes[f"fc{j}"][1:], float(fan_in + widths[j]))
    fan_in = width
  return out


def cost_weights(arch: networks.Arch, weighting: str) -> dict[str, np.ndarray] | None:
  """``{tau: f32[E, K]}`` group weights ``m_g = cost_g / mean_g cost_g`` (`group_costs`; the mean
  over all groups, so that ``lambda`` keeps its scale: ``sum_g m_g`` = number of groups), or None
  for ``'none'``.

  Raises:
    ValueError: an unknown `weighting`.
  """
  if weighting not in COST_WEIGHTINGS:
    raise ValueError(f"cost_weighting must be one of {COST_WEIGHTINGS}, got {weighting!r}")
  if weighting == "none":
    return None
  costs = group_costs(arch, weighting)
  mean = np.concatenate([c.reshape(-1) for c in costs.values()]).mean()
  return {tau: (c / mean).astype(np.float32) for tau, c in costs.items()}
