#!/usr/bin/env bash
# One prepared GPU session: CUDA tests, the throughput benchmark, then the missing `paper` presets in priority
# order until the time budget is spent; every new result is packed into one archive.
#
#   scripts/gpu_run.sh BUDGET_MINUTES [OUT_DIR]        e.g. scripts/gpu_run.sh 8 /tmp/out
#
# Needs python3 with torch, numpy, scipy, matplotlib, tqdm, pytest (no Jupyter: notebooks run in-process).
# CIFAR-10: $CIFAR10_ROOT, else built from .cifar10-part1..3 in the repository root if they are there (three
# folders of PNG batches, each with the cifar10_offline.py that rebuilds the pickles).
# Notebooks, in priority order, in two passes:
#   1. each with MAX_MINUTES = most of the time left: a preset whose ETA (measured on this device before anything
#      trains) fits is trained to its figure and claims; a pooling notebook (01, 03 to 07) whose full count does
#      not fit pools as many seeds or networks as fit ("n of N" in its title and JSON); one whose least count does
#      not fit prints its plan and is refused at once, and the next notebook is tried. Every notebook reached thus
#      prints its measured ETA.
#   2. with the time still left, the refused ones with MAX_MINUTES=None: they train what they can. Finished runs are
#      exported to results/<figure>/ as they complete, so the next session trains only what is missing.
# The archive is written again after the benchmark and after each notebook (a complete one replaces the last), so a
# command killed from outside (a lent machine's time limit) still leaves everything finished before the kill.
# Environment: PRESET (paper), ORDER ("02 05 03 04 06 07 01"), PY (python3); TESTS=0 and BENCH=0 skip the CUDA tests and
# the benchmark (a later window, once their results are committed, gives that time to the notebooks); GIT_COMMIT
# (the short hash of the commit a copied tree without .git was taken from, recorded in the claims JSON and results/).
# Dry run on a CPU: PRESET=smoke scripts/gpu_run.sh 4 /tmp/out
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_MIN=${1:?usage: scripts/gpu_run.sh BUDGET_MINUTES [OUT_DIR]}
OUT_DIR=${2:-${OUT:-runs/gpu_out}}
PRESET=${PRESET:-paper}
ORDER=${ORDER:-"02 05 03 04 06 07 01"}
PY=${PY:-python3}
TESTS=${TESTS:-1}
BENCH=${BENCH:-1}
mkdir -p "$OUT_DIR" runs
rm -f runs/bench.txt runs/gpu_nb_*.log  # this session's logs only
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
COMMIT=$($PY -c 'from common.cache import git_commit; print(git_commit())')
say "code: commit $COMMIT (what the claims JSON and results/ record)"
[ "$COMMIT" = unknown ] && say "WARNING: no git checkout here and GIT_COMMIT unset: set GIT_COMMIT=<short hash> for a copied tree"

pack() {  # the archive of everything so far; written aside, then renamed over the previous one
  tar czf "$OUT_DIR/.gpu_results.partial.tar.gz" --ignore-failed-read --exclude=".*.tmp-*" $(ls figures/*."$PRESET".* 2>/dev/null) \
    $( [ -d results ] && echo results ) $(ls runs/gpu_run.log runs/bench.txt runs/gpu_nb_*.log 2>/dev/null) 2>>"$LOG" \
    && mv -f "$OUT_DIR/.gpu_results.partial.tar.gz" "$OUT_DIR/gpu_results.tar.gz"
}
upto() { local t; t=$(left); [ -n "${1:-}" ] && [ "$1" -lt "$t" ] && t=$1; echo $(( t > 1 ? t : 1 )); }  # seconds: the time left, at most $1

if [ "$TESTS" = 1 ]; then
  say "CUDA tests"
  timeout -k 10 "$(upto 120)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_cache.py 2>&1 | tail -5 | tee -a "$LOG"
fi
if [ "$BENCH" = 1 ]; then
  say "throughput benchmark"
  timeout -k 10 "$(upto 90)" $PY benchmarks/throughput.py --repeats 2 2>&1 | tee runs/bench.txt | tail -12 | tee -a "$LOG"
fi
pack

run_nb() {  # run_nb NB MAX_MINUTES: one notebook in-process, at most the time left; its log in runs/gpu_nb_NB.log
  timeout -k 15 "$(upto)" $PY -m common.notebooks --preset "$PRESET" --engine inprocess --only "$1" --fig-dir figures \
    -p MAX_MINUTES="$2" > "runs/gpu_nb_$1.log" 2>&1
  local rc=$?
  tr '\r' '\n' < "runs/gpu_nb_$1.log" | grep -v 'it/s' | grep -E '^(plan:|\||ETA |pooling|status|PASS|FAIL|[0-9]+ passed)|done in|ERROR' \
    | tail -40 | tee -a "$LOG"
  case $rc in 124|137) say "notebook $1 stopped at the budget; its finished runs are in results/" ;; esac  # 137: -k sent KILL
  pack
  return 0
}

refused=""
for nb in $ORDER; do  # pass 1: what fits the time left trains to its figure; the rest print their plan
  t=$(left)
  if [ "$t" -lt 60 ]; then say "budget spent; not starting $nb"; refused="$refused $nb"; continue; fi
  m=$(awk -v t="$t" 'BEGIN { printf "%.1f", 0.8 * (t - 30) / 60 }')  # a margin for the figures and claims
  say "notebook $nb, preset $PRESET, MAX_MINUTES=$m"
  run_nb "$nb" "$m"
  grep -q 'BudgetExceeded' "runs/gpu_nb_$nb.log" && refused="$refused $nb"
done
for nb in $refused; do  # pass 2: the refused ones train what they can in the time still left
  [ "$(left)" -lt 60 ] && break
  say "notebook $nb, preset $PRESET, MAX_MINUTES=None (runs accumulate in results/), at most $(left)s"
  run_nb "$nb" None
done

say "packing"
pack
say "wrote $OUT_DIR/gpu_results.tar.gz ($(du -h "$OUT_DIR/gpu_results.tar.gz" | cut -f1))"
