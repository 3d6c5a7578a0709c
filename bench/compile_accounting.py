"""Where the test suite's XLA compiles go: eagerly dispatched ops against jitted programs.

Two halves in one file:

* a pytest plugin that records every backend compile (JAX's
  ``/jax/core/compile/backend_compile_duration`` event: XLA's compile, or its load from the
  persistent cache), every tracing and every lowering of a jitted function, with the running test
  and the function's name, one JSON line per event in ``<log dir>/compiles.<pid>.jsonl`` (each
  xdist worker writes its own file);
* a summary (run this file as a script) that splits the seconds into *eager ops* (a jax primitive
  or ``jax.numpy`` function called outside any ``jit``: each distinct op and shape is compiled on
  its own, in every process, and is too small for the persistent cache) and *jitted programs*,
  per test and per module.

Usage::

  rm -rf /tmp/compiles
  BNAS_COMPILE_LOG=/tmp/compiles PYTHONPATH=bench python -m pytest tests/ -n 2 --dist loadfile \
      -p compile_accounting
  python bench/compile_accounting.py /tmp/compiles --top 25 --by jitted

Subprocesses started by the tests (the CLI and multi-process tests) are not recorded. The seconds
are wall-clock on whatever else runs on the machine; compare the shares of one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

EVENT = "/jax/core/compile/backend_compile_duration"
# Tracing and lowering of jitted functions (recorded too, as the fourth field of a line).
STAGES = {EVENT: "xla", "/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}
LOG_DIR = os.environ.get("BNAS_COMPILE_LOG",
                         os.path.join(tempfile.gettempdir(), "bnas_jax_compiles"))


def _register() -> None:
  """Plugin half: append ``[test id, function name, seconds, stage]`` for each backend compile
  (stage ``xla``), tracing (``trace``) and lowering (``lower``)."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  os.makedirs(LOG_DIR, exist_ok=True)
  out = open(os.path.join(LOG_DIR, f"compiles.{os.getpid()}.jsonl"), "a")  # pylint: disable=consider-using-with

  def listener(event, duration, **kwargs):
    if event in STAGES:
      test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
      out.write(json.dumps([test, kwargs.get("fun_name"), round(float(duration), 4),
                            STAGES[event]]) + "\n")
      out.flush()

  monitoring.register_event_duration_secs_listener(listener)


def _eager_names() -> set[str]:
  """``jit(<name>)`` names of eagerly dispatched ops: jax primitives and jax.numpy functions."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src import core  # pylint: disable=g-import-not-at-top
  names = {o.name for o in gc.get_objects() if isinstance(o, core.Primitive)}
  names |= {n for n in dir(jnp) if callable(getattr(jnp, n, None))}
  names |= {"_" + n for n in list(names)}  # jnp's private wrappers (_where, _mean, _reduce_sum)
  return {f"jit({n})" for n in names}


def summarize(log_dir: str, top: int, by: str = "eager") -> None:
  rows = []
  for path in sorted(glob.glob(os.path.join(log_dir, "compiles.*.jsonl"))):
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  if not rows:
    sys.exit(f"no compiles.*.jsonl in {log_dir}: run pytest with -p compile_accounting first")
  eager = _eager_names()
  kind = lambda name: "eager" if name in eager else "jitted"
  total = collections.Counter()
  count = collections.Counter()
  per_test = collections.defaultdict(collections.Counter)
  per_module = collections.defaultdict(collections.Counter)
  stages = collections.Counter()
  names = collections.defaultdict(collections.Counter)
  for row in rows:
    test, name, seconds = row[:3]
    stage = row[3] if len(row) > 3 else "xla"
    if stage != "xla":
      stages[stage] += seconds
      continue
    k = kind(name)
    if k == "jitted":
      names[name][test.split("::")[0]] += seconds
    total[k] += seconds
    count[k] += 1
    per_test[test][k] += seconds
    per_module[test.split("::")[0]][k] += seconds
  print(f"{sum(count.values())} backend compiles: eager ops {count['eager']} in {total['eager']:.1f} s, "
        f"jitted programs {count['jitted']} in {total['jitted']:.1f} s (summed over processes)")
  if stages:
    print(f"tracing {stages['trace']:.1f} s, lowering {stages['lower']:.1f} s (jitted functions)")
  for title, table in (("module", per_module), ("test", per_test)):
    print(f"\n{'eager s':>8} {'jitted s':>9}  {title} (by {by} seconds)")
    for name, c in sorted(table.items(), key=lambda kv: -kv[1][by])[:top]:
      print(f"{c['eager']:8.1f} {c['jitted']:9.1f}  {name}")
  print(f"\n{'jitted s':>9} {'modules':>7}  jitted function name (by seconds)")
  for name, c in sorted(names.items(), key=lambda kv: -sum(kv[1].values()))[:top]:
    print(f"{sum(c.values()):9.1f} {len(c):7d}  {name}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("log_dir", nargs="?", default=LOG_DIR)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--by", choices=("eager", "jitted"), default="eager",
                 help="order the module and test tables by these seconds")
  args = p.parse_args()
  summarize(args.log_dir, args.top, args.by)


if __name__ == "__main__":
  main()
else:  # loaded by pytest as a plugin (-p compile_accounting)
  _register()
