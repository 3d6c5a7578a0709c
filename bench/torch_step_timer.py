"""Shared by the PyTorch twins of the supernet benches (``torch_*_reference.py``): importing
PyTorch (optional: not a bnas_jax dependency) and timing one training step the way the JAX benches
do (forward, mean cross-entropy, backward, SGD with momentum, train-mode BN)."""

from __future__ import annotations

import sys
import time
from typing import NamedTuple


def require_torch(script: str):
  """``(torch, nn, F)``; when PyTorch is missing, says so and exits 0 (`make bench` runs every
  script, and PyTorch is optional)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"{script}: PyTorch is not installed (not a bnas_jax dependency); `pip install torch` "
          "in a separate environment to run this reference")
    sys.exit(0)
  return torch, nn, F


def step_times(model, steps: int, warmup: int, channels_last: bool, batch: int) -> list[float]:
  """Seconds of each of `steps` training steps of `model` on one fixed CIFAR-sized batch, after
  `warmup` untimed steps (seed 0, SGD lr 0.01 momentum 0.9 on every parameter)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  times = []
  for i in range(steps + warmup):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def weight_count(model) -> int:
  """Parameters of `model` other than its switches."""
  return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("switches"))


class CellSpec(NamedTuple):
  """One cell of the DARTS-style macro structure: input widths C_{k-2}, C_{k-1}, its C, whether it
  and its predecessor reduce, its type and its index among the cells of that type."""
  c_pp: int
  c_p: int
  c: int
  reduction: bool
  reduction_prev: bool
  cell_type: str
  index: int


def cell_plan(c: int, cells: int) -> tuple[list[CellSpec], dict[str, int], int]:
  """The cells after a 3C stem (reductions at cells // 3 and 2 cells // 3, C doubled there, 4 nodes
  concatenated): ``(specs, {cell type: count}, width of the last cell's output)``."""
  c_pp, c_p, c_cur, red_prev = 3 * c, 3 * c, c, False
  counts = {"normal": 0, "reduce": 0}
  specs = []
  for i in range(cells):
    red = i in (cells // 3, 2 * cells // 3)
    c_cur = 2 * c_cur if red else c_cur
    t = "reduce" if red else "normal"
    specs.append(CellSpec(c_pp, c_p, c_cur, red, red_prev, t, counts[t]))
    counts[t] += 1
    c_pp, c_p, red_prev = c_p, 4 * c_cur, red
  return specs, counts, c_p
