"""PyTorch reference for the darts CPU supernet step: the figure to beat.

Builds, in plain PyTorch, the same supernet as ``bench_supernet.py --configs darts_cpu`` and
``bench_op_groups.py`` (DARTS search cells, 5 cells, C = 8, batch 32, stem 3C + BN, ops with
``affine=False``, BN after the pools, preprocessing ReLU-Conv-BN / FactorizedReduce, every op of an
edge scaled by its switch and the edge input by the origin switch) and times one training step:
forward, cross-entropy, backward, SGD with momentum on weights and switches, train-mode BN. It
prints the median step for the full supernet and for supernets keeping one candidate-op group
(the same groups as ``bench_op_groups.py``), in NCHW and channels_last memory formats.

PyTorch is not a dependency of bnas_jax; install it in a separate environment to run this
(``pip install torch``). Usage:

  python bench/torch_darts_reference.py
  python bench/torch_darts_reference.py --threads 2 --steps 6 --groups all,sep

Figures (with the commands that produced them) are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch_step_timer

torch, nn, F = torch_step_timer.require_torch("torch_darts_reference")

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
       "dil_conv_3x3", "dil_conv_5x5")
GROUPS = {
    "all": OPS,
    "pools": ("max_pool_3x3", "avg_pool_3x3"),
    "skip": ("skip_connect",),
    "sep": ("sep_conv_3x3", "sep_conv_5x5"),
    "dil": ("dil_conv_3x3", "dil_conv_5x5"),
}


def relu_conv_bn(c_in, c_out, k, stride, pad):
  return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, pad, bias=False),
                       nn.BatchNorm2d(c_out, affine=False))


def dil_conv(c, k, stride, pad, dil):
  return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, pad, dilation=dil, groups=c,
                                            bias=False),
                       nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))


def sep_conv(c, k, stride, pad):
  return nn.Sequential(dil_conv(c, k, stride, pad, 1), dil_conv(c, k, 1, pad, 1))


class Zero(nn.Module):

  def __init__(self, stride):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    return x[:, :, ::self.stride, ::self.stride] * 0.0


class FactorizedReduce(nn.Module):

  def __init__(self, c_in, c_out):
    super().__init__()
    self.c1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.c2 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.bn = nn.BatchNorm2d(c_out, affine=False)

  def forward(self, x):
    x = F.relu(x)
    return self.bn(torch.cat([self.c1(x), self.c2(x[:, :, 1:, 1:])], dim=1))


def make_op(name, c, stride):
  if name == "none":
    return Zero(stride)
  if name == "max_pool_3x3":
    return nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(c, affine=False))
  if name == "avg_pool_3x3":
    return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False),
                         nn.BatchNorm2d(c, affine=False))
  if name == "skip_connect":
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
  if name.startswith("sep_conv"):
    k = int(name[-1])
    return sep_conv(c, k, stride, k // 2)
  k = int(name[-1])
  return dil_conv(c, k, stride, k - 1, 2)


class Cell(nn.Module):

  def __init__(self, ops, c_pp, c_p, c, reduction, reduction_prev):
    super().__init__()
    self.reduction = reduction
    self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else relu_conv_bn(c_pp, c, 1, 1, 0)
    self.pre1 = relu_conv_bn(c_p, c, 1, 1, 0)
    self.edges = nn.ModuleList()
    for node in range(4):
      for src in range(2 + node):
        stride = 2 if reduction and src < 2 else 1
        self.edges.append(nn.ModuleList([make_op(o, c, stride) for o in ops]))

  def forward(self, s0, s1, sw):
    """sw: [14, 1 + len(ops)] switches (origin first)."""
    states = [self.pre0(s0), self.pre1(s1)]
    e = 0
    for _ in range(4):
      acc = 0
      for h in states:
        xin = h * sw[e, 0]
        acc = acc + sum(sw[e, 1 + j] * op(xin) for j, op in enumerate(self.edges[e]))
        e += 1
      states.append(acc)
    return torch.cat(states[2:], dim=1)


class Supernet(nn.Module):

  def __init__(self, ops, c=8, cells=5, classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 3 * c, 3, padding=1, bias=False), nn.BatchNorm2d(3 * c))
    plan, n_types, c_p = torch_step_timer.cell_plan(c, cells)
    self.cells = nn.ModuleList(Cell(ops, p.c_pp, p.c_p, p.c, p.reduction, p.reduction_prev)
                               for p in plan)
    self.types = [(p.cell_type, p.index) for p in plan]
    self.switches = nn.ParameterDict({
        t: nn.Parameter(torch.ones(n, 14, 1 + len(ops))) for t, n in n_types.items()})
    self.classifier = nn.Linear(c_p, classes)

  def forward(self, x):
    s0 = s1 = self.stem(x)
    for cell, (t, idx) in zip(self.cells, self.types):
      s0, s1 = s1, cell(s0, s1, self.switches[t][idx])
    return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def time_step(ops, steps, channels_last, batch=32, c=8, cells=5):
  torch.manual_seed(0)
  model = Supernet(ops, c, cells)
  times = torch_step_timer.step_times(model, steps, 2, channels_last, batch)
  return statistics.median(times), torch_step_timer.weight_count(model)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  p.add_argument("--groups", default=",".join(GROUPS))
  args = p.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; darts, C=8, cells=5, "
        "batch=32")
  for g in args.groups.split(","):
    for cl in (False, True):
      step, n_w = time_step(GROUPS[g], args.steps, cl)
      print(f"{g:6s} {'channels_last' if cl else 'NCHW':13s} step {step:.3f} s  "
            f"({n_w:,} weights)", flush=True)


if __name__ == "__main__":
  main()
