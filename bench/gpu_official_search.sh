#!/usr/bin/env bash
# The official BayesNAS proxy search (experiments/cifar_proxy.py: C = 36, 8 cells, batch 18,
# 5k warm-up + T = 3 x 40k-image search epochs) on one GPU, inside a fixed time budget.
#
# Steps: print the environment; build the CIFAR-10 binary layout from the JPEG-derived copy;
# time the depthwise-conv implementations on this GPU (bench/bench_depthwise.py) and search with
# the fastest; stop the search at the budget with SIGTERM (the runner checkpoints the step it is at;
# every finished iteration has written iterations/tNN/genotype.json); pack the run directory
# without checkpoints into $OUT.
#
# Run it again on the same machine and it resumes: the data, the depthwise choice, the run
# directory and JAX's persistent compilation cache all live under $WORK. One H200 needs about
# 7 min of training steps for the whole protocol plus the compilations (measured 2026-11-29:
# 61 ms per step; 3 min to compile the first step).
#
# Usage (from the repository root):
#   OUT=/tmp/gpu_out JPEG_DIR=../shared/data/cifar10-jpeg-q75-derived BUDGET_S=560 \
#     bash bench/gpu_official_search.sh
# Env:
#   OUT        where logs and the packed run go (default ./gpu_out)
#   JPEG_DIR   folder with cifar10-jpeg-q75.tar.gz and make_cifar10_bin.py
#              (default ../shared/data/cifar10-jpeg-q75-derived)
#   WHEELS     optional folder of wheels to install first (packages the machine lacks)
#   BUDGET_S   seconds for the whole script (default 560); the search gets what is left after
#              setup minus COLLECT_S
#   CONFIG     experiment (default experiments/cifar_proxy.py); EXTRA: more --config overrides
#   DW_IMPL    skip the depthwise benchmark and use this implementation
#   DATA       an existing cifar-10-batches-bin folder (skips building one from JPEG_DIR)
# Exit code: the search's (0 finished, 143 stopped at the budget and checkpointed, 137 killed).
set -u
T0=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
JPEG_DIR=${JPEG_DIR:-../shared/data/cifar10-jpeg-q75-derived}
BUDGET_S=${BUDGET_S:-560}
COLLECT_S=${COLLECT_S:-30}
CONFIG=${CONFIG:-experiments/cifar_proxy.py}
EXTRA=${EXTRA:-}
WORK=${WORK:-/tmp/bnas_gpu}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export BNAS_JAX_CACHE_DIR=${BNAS_JAX_CACHE_DIR:-$WORK/jax_cache}
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$OUT/steps.log"; }

if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

say "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "tensorboardX",
          "numpy"):
  try:
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "?"))
  except Exception as e:  # pylint: disable=broad-except
    print(m, "MISSING", e)
import jax
print("devices", jax.devices())
EOF
} 2>&1 | tee "$OUT/env.txt"

say "data"
DATA=${DATA:-$WORK/cifar-10-batches-bin}
if [ ! -f "$DATA/test_batch.bin" ]; then
  $PY "$JPEG_DIR/make_cifar10_bin.py" "$DATA" > "$OUT/data.log" 2>&1 \
    || { say "data build failed"; cat "$OUT/data.log"; exit 1; }
fi

if [ -z "${DW_IMPL:-}" ] && [ -f "$WORK/dw_impl.txt" ]; then
  DW_IMPL=$(cat "$WORK/dw_impl.txt")
fi
if [ -z "${DW_IMPL:-}" ]; then
  say "depthwise benchmark"
  timeout 120 $PY bench/bench_depthwise.py --json "$OUT/depthwise.json" 2>&1 | tee "$OUT/depthwise.log"
  DW_IMPL=$(sed -n 's/^best: //p' "$OUT/depthwise.log")
  DW_IMPL=${DW_IMPL:-auto}
  echo "$DW_IMPL" > "$WORK/dw_impl.txt"
fi
say "search with dw_impl=$DW_IMPL"

LEFT=$(( BUDGET_S - $(elapsed) - 2 * COLLECT_S ))
if [ "$LEFT" -lt 1 ]; then
  say "BUDGET_S=$BUDGET_S leaves no time for the search after setup ($(elapsed)s) and 2 x COLLECT_S"
  exit 2
fi
say "search budget ${LEFT}s"
# shellcheck disable=SC2086
timeout --preserve-status -s TERM -k "$COLLECT_S" "$LEFT" $PY -m bnas_jax.main --config "$CONFIG" --workdir "$WORK/run" \
    --config.data.data_dir="$DATA" --config.model.dw_impl="$DW_IMPL" $EXTRA \
    > "$OUT/search_stdout.log" 2>&1
RC=$?
say "search exit code $RC (143 = stopped at the budget and checkpointed; 137 = killed)"
tail -c 4000 "$OUT/search_stdout.log" | tr '\r' '\n' | tail -n 15

say "collect"
tar -C "$WORK" --exclude=run/checkpoints -czf "$OUT/run.tar.gz" run 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/env.txt" 2>&1
grep -h -A2 "iteration [0-9]*: val\|search finished\|genotype:" "$WORK/run/log.txt" 2>/dev/null \
  | cut -c1-400
ls "$WORK/run/iterations" 2>/dev/null
say "done"
exit $RC
