#!/usr/bin/env bash
# One prepared GPU session: CUDA tests, the throughput benchmark, then the missing `paper` presets in priority
# order until the time budget is spent; every new result is packed into one archive.
#
#   scripts/gpu_run.sh BUDGET_MINUTES [OUT_DIR]        e.g. scripts/gpu_run.sh 8 /tmp/out
#
# Needs python3 with torch, numpy, scipy, matplotlib, tqdm, pytest (no Jupyter: notebooks run in-process).
# CIFAR-10: $CIFAR10_ROOT, else built from .cifar10-part1..3 in the repository root if they are there (three
# folders of PNG batches, each with the cifar10_offline.py that rebuilds the pickles). Each notebook's finished runs are
# exported to results/<figure>/ as they complete, so a preset cut off by the budget keeps what it finished and
# the next session trains only what is missing. First (PLAN_FIRST=1, the default) each notebook prints its plan: the
# runs still missing and their ETA measured on this device, nothing trained. Dry run on a CPU: PRESET=smoke scripts/gpu_run.sh 2 /tmp/out
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_MIN=${1:?usage: scripts/gpu_run.sh BUDGET_MINUTES [OUT_DIR]}
OUT_DIR=${2:-${OUT:-runs/gpu_out}}
PRESET=${PRESET:-paper}
ORDER=${ORDER:-"02 05 03 04 01"}
PY=${PY:-python3}
mkdir -p "$OUT_DIR" runs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=1
START=$(date +%s)
LOG=runs/gpu_run.log
: > "$LOG"
left() { echo $(( BUDGET_MIN * 60 - ($(date +%s) - START) )); }
say() { echo "[gpu_run +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if [ -z "${CIFAR10_ROOT:-}" ] && [ -d .cifar10-part1 ]; then
  mkdir -p runs/c10parts && cp .cifar10-part*/* runs/c10parts/
  $PY runs/c10parts/cifar10_offline.py runs/cifar10 --from-png runs/c10parts >> "$LOG" 2>&1 && export CIFAR10_ROOT=$PWD/runs/cifar10
fi
say "device: $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")'), torch $($PY -c 'import torch; print(torch.__version__)'), CIFAR10_ROOT=${CIFAR10_ROOT:-unset}"

say "CUDA tests"
timeout $(( $(left) > 120 ? 120 : $(left) )) $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_cache.py 2>&1 | tail -5 | tee -a "$LOG"

say "throughput benchmark"
timeout $(( $(left) > 90 ? 90 : $(left) )) $PY benchmarks/throughput.py --repeats 2 2>&1 | tee runs/bench.txt | tail -12 | tee -a "$LOG"

if [ "${PLAN_FIRST:-1}" = 1 ]; then
  # every notebook's plan on this device, nothing trained (MAX_MINUTES=0 refuses after printing the measured ETA)
  say "ETA of the missing $PRESET runs on this device"
  for nb in $ORDER; do
    [ "$(left)" -lt 240 ] && break
    timeout 60 $PY -m common.notebooks --preset "$PRESET" --engine inprocess --only "$nb" --fig-dir runs/plan_figures \
      -p MAX_MINUTES=0 2>&1 | tr '\r' '\n' | grep -E '^(plan:|\||ETA )' | tee -a "$LOG"
  done
fi

for nb in $ORDER; do
  t=$(left)
  if [ "$t" -lt 30 ]; then say "budget spent; not starting $nb"; continue; fi
  say "notebook $nb, preset $PRESET, at most ${t}s"
  # MAX_MINUTES=None: a preset longer than the window still trains what it can; finished runs go to results/
  timeout "$t" $PY -m common.notebooks --preset "$PRESET" --engine inprocess --only "$nb" --fig-dir figures -p MAX_MINUTES=None \
    2>&1 | tr '\r' '\n' | grep -v 'it/s' | tail -30 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 124 ] && say "notebook $nb stopped at the budget; its finished runs are in results/"
done

say "packing"
tar czf "$OUT_DIR/gpu_results.tar.gz" --ignore-failed-read $(ls figures/*."$PRESET"* 2>/dev/null) \
  $( [ -d results ] && echo results ) runs/gpu_run.log runs/bench.txt runs/notebooks/*.log 2>>"$LOG"
say "wrote $OUT_DIR/gpu_results.tar.gz ($(du -h "$OUT_DIR/gpu_results.tar.gz" | cut -f1))"
