"""PyTorch twin of the official BayesNAS search supernet step: the figure to beat.

Builds, in plain PyTorch and from the BayesNAS specification (section 2: the ops, the 8-edge
cells, CReduct preprocessing, the macro structure), the same supernet as
``bench_supernet.py --configs bayesnas_official`` (8 cells, C = 36, batch 18: 26,910,838 weights,
512 switches): stem 3 x 3 conv 3 -> 3C without BN; before every cell CReduct blocks
([1 x 1 stride-2 conv] -> BN -> ReLU -> 1 x 1 conv); cells of 8 edges whose 7 candidate ops
(sep 3/5, full dilated conv 3/5, zero-padded max pool, average pool counting the padding,
identity / BN + 1 x 1 stride-2 conv) are scaled by their switches and the edge input by the
origin switch; the cell output concatenates nodes 2..5; head BN -> ReLU -> global average pool
-> Linear. It times one training step as the JAX bench does: forward, mean cross-entropy,
backward, SGD with momentum (lr 0.01, 0.9) on weights and switches, train-mode BN.

PyTorch is not a dependency of bnas_jax; install it in a separate environment to run this
(``pip install torch``). Usage:

  python bench/torch_bayesnas_reference.py                       # official config, both layouts
  python bench/torch_bayesnas_reference.py --threads 2 --steps 5 --layouts channels_last
  python bench/torch_bayesnas_reference.py --channels 8 --cells 5 --batch 32   # the cpu size
  python bench/torch_bayesnas_reference.py --threads 2 --groups   # + one op group per supernet

Figures (with the commands that produced them) are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch_step_timer

torch, nn, F = torch_step_timer.require_torch("torch_bayesnas_reference")

OPS = ("sep3", "sep5", "dil3", "dil5", "max", "avg", "ident")
# The op groups of bench_op_groups.py (one group kept on every edge).
GROUPS = {"pools": ("max", "avg"), "skip": ("ident",), "sep": ("sep3", "sep5"),
          "dil": ("dil3", "dil5")}
# (source, target) of the 8 edges, nodes 0, 1 = the preprocessed inputs (k-2, k-1), in the
# order of bnas_jax.search_space.spaces (bayesnas); the cell output concatenates nodes 2..5.
EDGES = {
    "normal": ((1, 2), (0, 2), (1, 3), (0, 3), (1, 4), (0, 4), (0, 5), (2, 5)),
    "reduce": ((1, 2), (0, 2), (0, 3), (2, 3), (0, 4), (2, 4), (0, 5), (2, 5)),
}


def bn_relu_conv(c_in, c_out, k, stride, pad, dil=1, groups=1):
  return [nn.BatchNorm2d(c_in), nn.ReLU(),
          nn.Conv2d(c_in, c_out, k, stride, pad, dilation=dil, groups=groups, bias=False)]


def sep_conv(c, k, stride):
  layers = []
  for r in range(2):
    layers += bn_relu_conv(c, c, k, stride if r == 0 else 1, k // 2, groups=c)
    layers.append(nn.Conv2d(c, c, 1, bias=False))
  return nn.Sequential(*layers)


def dil_conv(c, k, stride):
  return nn.Sequential(*bn_relu_conv(c, c, k, stride, k - 1, dil=2),
                       nn.Conv2d(c, c, 1, bias=False))


class MaxPoolZeroPad(nn.Module):

  def __init__(self, stride):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, self.stride)


def make_op(name, c, stride):
  if name.startswith("sep"):
    return sep_conv(c, int(name[-1]), stride)
  if name.startswith("dil"):
    return dil_conv(c, int(name[-1]), stride)
  if name == "max":
    return MaxPoolZeroPad(stride)
  if name == "avg":
    return nn.AvgPool2d(3, stride, 1, count_include_pad=True)
  if stride == 1:
    return nn.Identity()
  return nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 1, 2, bias=False))


class CReduct(nn.Module):

  def __init__(self, c_in, c_out, reduce_input):
    super().__init__()
    self.reduce = nn.Conv2d(c_in, c_in, 1, 2, bias=False) if reduce_input else None
    self.body = nn.Sequential(*bn_relu_conv(c_in, c_out, 1, 1, 0))

  def forward(self, x):
    return self.body(x if self.reduce is None else self.reduce(x))


class Cell(nn.Module):

  def __init__(self, c_pp, c_p, c, reduction, reduction_prev, ops=OPS):
    super().__init__()
    self.pre0 = CReduct(c_pp, c, reduction_prev)
    self.pre1 = CReduct(c_p, c, False)
    self.topo = EDGES["reduce" if reduction else "normal"]
    # Ops left out of `ops` are not built or run (as a pruned op under pruned_ops='skip').
    self.kept = [j for j, o in enumerate(OPS) if o in ops]
    self.edges = nn.ModuleList(
        nn.ModuleList(make_op(OPS[j], c, 2 if reduction and src < 2 else 1) for j in self.kept)
        for src, _ in self.topo)

  def forward(self, s0, s1, sw):
    """sw: [8, 1 + 7] switches (origin first)."""
    nodes = [self.pre0(s0), self.pre1(s1), 0, 0, 0, 0]
    for e in sorted(range(len(self.topo)), key=lambda i: self.topo[i][::-1]):
      src, tgt = self.topo[e]
      xin = nodes[src] * sw[e, 0]
      nodes[tgt] = nodes[tgt] + sum(sw[e, 1 + j] * op(xin)
                                    for j, op in zip(self.kept, self.edges[e]))
    return torch.cat(nodes[2:], dim=1)


class Supernet(nn.Module):

  def __init__(self, c=36, cells=8, classes=10, ops=OPS):
    super().__init__()
    self.stem = nn.Conv2d(3, 3 * c, 3, padding=1, bias=False)
    plan, n_types, c_p = torch_step_timer.cell_plan(c, cells)
    self.cells = nn.ModuleList(Cell(p.c_pp, p.c_p, p.c, p.reduction, p.reduction_prev, ops)
                               for p in plan)
    self.types = [(p.cell_type, p.index) for p in plan]
    self.switches = nn.ParameterDict({
        t: nn.Parameter(torch.ones(n, 8, 1 + len(OPS))) for t, n in n_types.items()})
    self.head_bn = nn.BatchNorm2d(c_p)
    self.classifier = nn.Linear(c_p, classes)

  def forward(self, x):
    s0 = s1 = self.stem(x)
    for cell, (t, idx) in zip(self.cells, self.types):
      s0, s1 = s1, cell(s0, s1, self.switches[t][idx])
    x = F.relu(self.head_bn(s1))
    return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def time_step(steps, channels_last, batch, c, cells, ops=OPS):
  torch.manual_seed(0)
  model = Supernet(c, cells, ops=ops)
  times = torch_step_timer.step_times(model, steps, 1, channels_last, batch)  # 1 warm-up step
  n_switches = sum(p.numel() for p in model.switches.parameters())
  return (statistics.median(times), min(times), torch_step_timer.weight_count(model),
          n_switches)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  p.add_argument("--channels", type=int, default=36)
  p.add_argument("--cells", type=int, default=8)
  p.add_argument("--batch", type=int, default=18)
  p.add_argument("--layouts", default="NCHW,channels_last")
  p.add_argument("--groups", action="store_true",
                 help="also time supernets that keep one op group on every edge (the rows of "
                      "bench_op_groups.py --space bayesnas)")
  args = p.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bayesnas, "
        f"C={args.channels}, cells={args.cells}, batch={args.batch}")
  variants = [("all", OPS)] + (list(GROUPS.items()) if args.groups else [])
  for layout in args.layouts.split(","):
    for name, ops in variants:
      step, fastest, n_w, n_s = time_step(args.steps, layout == "channels_last", args.batch,
                                          args.channels, args.cells, ops)
      print(f"{layout:13s} {name:5s} step_median={step:.3f}s (min {fastest:.3f}s)  "
            f"({n_w:,} weights, {n_s} switches)", flush=True)


if __name__ == "__main__":
  main()
