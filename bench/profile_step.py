"""Where the runner's search step spends its time on a CPU, by the model's op names.

Builds the runner's own train step (`search_steps.step_fns`) for a search config, runs it a few
times, traces `--steps` more with `jax.profiler` (XLA:CPU records every kernel it runs), and joins
the kernels to the optimised HLO's ``op_name`` metadata (dumped by XLA for this program only).
Prints the median step time, then the summed kernel time per step grouped by direction (``fwd``,
``bwd``: the transpose of the forward pass, remat included) and model path (cell indices merged:
``bwd:cell/EdgeOps/dil5``); with ``--detail PATTERN`` the kernels of the groups that contain
PATTERN, by kernel kind, shape and the op that made them. Kernel times are summed over XLA:CPU's
threads, so their total exceeds the wall time of a step.

Usage:
  python bench/profile_step.py                                   # cifar_proxy:cpu
  python bench/profile_step.py --config experiments/cifar_proxy.py --detail EdgeOps/dil5
  python bench/profile_step.py -- --config.model.remat=False     # overrides, as for main

Timings are wall-clock on whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time


def _parse():
  argv = sys.argv[1:]
  overrides = []
  if "--" in argv:
    i = argv.index("--")
    argv, overrides = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/cifar_proxy.py:cpu",
                 help="search config file, ':variant' optional")
  p.add_argument("--steps", type=int, default=3, help="profiled steps")
  p.add_argument("--warm", type=int, default=3, help="timed steps before the profile")
  p.add_argument("--top", type=int, default=30, help="rows of the table")
  p.add_argument("--detail", default="", help="also list the kernels of the groups with this text")
  args = p.parse_args(argv)
  for o in overrides:
    if not o.startswith("--config.") or "=" not in o:
      raise SystemExit(f"override {o!r}: write --config.<field>=<value>")
  return args, overrides


def _group(op_name: str) -> str:
  """``bwd:cell/EdgeOps/dil5`` from a kernel's HLO ``op_name``."""
  parts = re.sub(r"cell_\d+", "cell", op_name).split("/")
  direction = "bwd" if len(parts) > 1 and parts[1].startswith("transpose") else "fwd"
  keep = [q for q in parts[2:] if q not in ("while", "body", "closed_call", "checkpoint", "cond")]
  return direction + ":" + "/".join(keep[:3])


def main() -> None:
  args, overrides = _parse()
  dump = tempfile.mkdtemp(prefix="bnas_profile_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}/hlo "
                             "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,unused-import
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bnas_jax import search_steps  # pylint: disable=g-import-not-at-top
  from bnas_jax.models import supernet as supernet_lib  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", args.config)
  flags.FLAGS(["profile_step", f"--config={args.config}", *overrides])
  config = flags.FLAGS.config
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = {k: v.shape for k, v in supernet_lib.init_switches(
      config.space, config.model.num_cells).items()}
  state = jax.device_put(jax.jit(lambda k: search_steps.init_state(config, 10, shapes, k))(
      search_steps.init_key(0)), rep)
  acc = jax.device_put(search_steps.new_train_acc(), rep)
  b = int(config.search.batch_size)
  rng = np.random.default_rng(0)
  batch = jax.device_put({"image": jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32),
                          "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32)}, rep)
  step = search_steps.step_fns(search_steps.StepKey.create(config, 10, None, mesh)).search_step
  t0 = time.perf_counter()
  state, acc = jax.block_until_ready(step(state, acc, batch))
  print(f"{args.config} {' '.join(overrides)}: batch {b}; compile + first step "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  times = []
  for _ in range(args.warm):
    t0 = time.perf_counter()
    state, acc = jax.block_until_ready(step(state, acc, batch))
    times.append(time.perf_counter() - t0)
  print(f"median step {statistics.median(times):.3f} s over {len(times)}", flush=True)
  jax.profiler.start_trace(f"{dump}/trace")
  for _ in range(args.steps):
    state, acc = jax.block_until_ready(step(state, acc, batch))
  jax.profiler.stop_trace()

  hlo = sorted(glob.glob(f"{dump}/hlo/*train_step*cpu_after_optimizations.txt"))
  traces = glob.glob(f"{dump}/trace/plugins/profile/*/*.trace.json.gz")
  if not hlo or not traces:
    raise SystemExit(f"no HLO dump or trace under {dump}")
  meta = {}
  with open(hlo[-1]) as f:
    for line in f:
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+).*?op_name=\"([^\"]+)\"", line)
      if m:
        meta[m.group(1)] = (m.group(2), m.group(3))
  with gzip.open(traces[0]) as f:
    # Loops and calls span their bodies' kernels: only the kernels are counted.
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e["name"] in meta
              and not e["name"].startswith(("while", "conditional", "call"))]
  per_group, calls = collections.defaultdict(float), collections.Counter()
  detail, detail_calls = collections.defaultdict(float), collections.Counter()
  for e in events:
    shape, op = meta[e["name"]]
    g = _group(op)
    per_group[g] += e["dur"]
    calls[g] += 1
    if args.detail and args.detail in g:
      k = f"{g}  {re.sub(r'[.][0-9]+$', '', e['name'])} {shape[:36]} <- {op.split('/')[-1]}"
      detail[k] += e["dur"]
      detail_calls[k] += 1
  n = args.steps
  print(f"\nkernel time per step, summed over threads: {sum(per_group.values()) / n / 1e3:.1f} ms "
        f"({len(events) // n} kernels)")
  for g, us in sorted(per_group.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {us / n / 1e3:9.1f} ms  {calls[g] // n:6d} kernels  {g}")
  if detail:
    print(f"\nkernels of the groups with {args.detail!r}:")
    for k, us in sorted(detail.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"  {us / n / 1e3:9.1f} ms  {detail_calls[k] // n:6d} calls  {k}")
  print(f"\n(HLO and trace: {dump})")


if __name__ == "__main__":
  main()
