"""Cold-start wall time of a whole search, split into compilation and the rest.

Runs ``python -m bnas_jax.main --config <config> --workdir <fresh dir>`` in a subprocess whose
persistent compilation cache (``BNAS_JAX_CACHE_DIR``) is a fresh empty folder, so every program
is compiled from scratch, as on a first run. The subprocess sums JAX's own compile events
(`jax.monitoring`: jaxpr tracing, lowering to MLIR, XLA backend compile) over every jitted
function of the run, and the runner's compile log lines ("compiled the <program> in N s") give the
time per search program (tracing + lowering + XLA of that program). The process's CPU time (all
threads) is printed too: on a shared machine it swings less than the wall time.

Prints the wall time of the subprocess, the compile total (tracing, lowering, XLA), the rest
(imports, data loading, initialisation, the steps themselves, checkpoints) and each logged
program's compile time.

Usage:
  python bench/bench_cold_search.py                        # cifar_proxy:cpu, 5 steps per epoch
  python bench/bench_cold_search.py --max_steps 0          # the full epochs (slow on a CPU)
  python bench/bench_cold_search.py --config experiments/cifar_proxy_darts.py:cpu
  python bench/bench_cold_search.py -- --config.model.edge_loop=unroll   # extra flags to main

``--max_steps N`` caps every epoch at N steps (``--config.search.max_steps_per_epoch``); the
compile total does not depend on it, the rest does. Timings are wall-clock on whatever else runs
on the machine.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

EVENTS = {  # jax._src.dispatch
    "trace": "/jax/core/compile/jaxpr_trace_duration",
    "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "xla": "/jax/core/compile/backend_compile_duration",
}
_LOG_RE = re.compile(r"compiled the (.+) in ([0-9.]+) s")


def _inner(out_json: str, main_argv: list[str]) -> None:
  """In the subprocess: sum the compile events, then run bnas_jax.main with `main_argv`."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  sums = collections.defaultdict(float)
  counts = collections.defaultdict(int)
  names = {v: k for k, v in EVENTS.items()}

  def listener(event, duration, **_):
    if event in names:
      sums[names[event]] += duration
      counts[names[event]] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)

  def dump():
    with open(out_json, "w") as f:
      json.dump({"seconds": dict(sums), "counts": dict(counts)}, f)

  atexit.register(dump)
  from bnas_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  sys.argv = ["bnas_jax.main", *main_argv]
  app.run(main_lib.main, flags_parser=main_lib.parse_flags)


def run_cold(config: str, max_steps: int, extra: list[str], keep: bool = False) -> dict:
  """One cold run of the search; returns its wall time and compile breakdown."""
  tmp = tempfile.mkdtemp(prefix="bnas_cold_")
  cache, workdir = os.path.join(tmp, "jax_cache"), os.path.join(tmp, "run")
  out_json, log = os.path.join(tmp, "compile.json"), os.path.join(tmp, "stderr.log")
  main_argv = ["--config", config, "--workdir", workdir]
  if max_steps > 0:
    main_argv.append(f"--config.search.max_steps_per_epoch={max_steps}")
  main_argv += extra
  env = dict(os.environ, BNAS_JAX_CACHE_DIR=cache)
  cmd = [sys.executable, os.path.abspath(__file__), "--inner", out_json, "--", *main_argv]
  ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
  wall = time.perf_counter() - t0
  ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
  text = open(log).read()
  if proc.returncode != 0:
    raise SystemExit(f"the search failed (exit {proc.returncode}); log: {log}\n{text[-3000:]}")
  with open(out_json) as f:
    events = json.load(f)
  programs = [(m.group(1), float(m.group(2))) for m in _LOG_RE.finditer(text)]
  result = {"wall_s": wall, "cpu_s": cpu, "events": events, "programs": programs, "argv": main_argv,
            "tmp": tmp}
  if not keep:
    shutil.rmtree(tmp, ignore_errors=True)
  return result


def report(r: dict) -> str:
  s, n = r["events"]["seconds"], r["events"]["counts"]
  compile_s = sum(s.values())
  lines = [
      "python -m bnas_jax.main " + " ".join(r["argv"][:1] + r["argv"][1:2] + ["--workdir", "<tmp>"]
                                            + r["argv"][4:]) + "  (cold compilation cache)",
      f"  wall {r['wall_s']:.1f} s = compile {compile_s:.1f} s + rest {r['wall_s'] - compile_s:.1f} s"
      f"  (CPU time of the process: {r['cpu_s']:.1f} s)",
      f"  compile: tracing {s.get('trace', 0):.1f} s ({n.get('trace', 0)} jaxprs), lowering "
      f"{s.get('lower', 0):.1f} s, XLA {s.get('xla', 0):.1f} s ({n.get('xla', 0)} programs)",
  ]
  for name, sec in r["programs"]:
    lines.append(f"    {sec:6.1f} s  {name}")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--inner":
    rest = argv[2:]
    if rest and rest[0] == "--":
      rest = rest[1:]
    _inner(argv[1], rest)
    return
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/cifar_proxy.py:cpu")
  p.add_argument("--max_steps", type=int, default=5,
                 help="cap on the steps of every epoch (0: full epochs)")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--keep", action="store_true", help="keep the temp folder (log, run directory)")
  args = p.parse_args(argv)
  cap = f"{args.max_steps} steps per epoch" if args.max_steps > 0 else "full epochs"
  print(f"cold search of {args.config} ({cap}); extra flags: {' '.join(extra) or 'none'}",
        flush=True)
  for _ in range(args.repeats):
    r = run_cold(args.config, args.max_steps, extra, args.keep)
    print(report(r), flush=True)
    if args.keep:
      print(f"  kept: {r['tmp']}")


if __name__ == "__main__":
  main()
