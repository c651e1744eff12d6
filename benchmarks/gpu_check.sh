#!/usr/bin/env bash
# The GPU check (issue 18), for the day a CUDA machine is lent: the CUDA tests, then bench_score (a short list and
# the steady state, fp16, clips of several videos per model batch), bench_align on CUDA and bench_train (clips/s,
# data loader vs step rate, fp16 with loss scaling, channels_last), each under its own time limit (7.5 min in all),
# ending with one table. Targets on one H100-class GPU: score-video <= 1 s per 10 s 1080p30 clip in steady state,
# the data loader >= 3x the step rate.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: lists what it would run and checks that each step's
#                                           # script and tests load (no GPU needed; tests/test_benchmarks.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d)}

# name | seconds allowed | command | lines of its output that go into the table (grep -E)
STEPS=(
  "cuda tests|60|$PY -m pytest -q -rs -k on_cuda tests|passed|failed|skipped|error"
  "bench_score|180|$PY benchmarks/bench_score.py --models default --clips 3 --long-seconds 60 --repeats 1|^CPU|default:"
  "bench_align|90|$PY benchmarks/bench_align.py --device cuda|speed-up at|faces found"
  "bench_train|120|$PY benchmarks/bench_train.py --device cuda --batch 16 --workers 8 --steps 5 --skip-forward|step:|loader:"
)

if [ "${1:-}" = "--dry-run" ]; then
  status=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command _ <<< "$step"
    echo "would run ($name, at most ${limit} s): $command"
  done
  # what can be checked without a GPU: the scripts load and take their options, the CUDA tests are collected
  for script in bench_score bench_align bench_train; do
    "$PY" "benchmarks/$script.py" --help > /dev/null || { echo "error: benchmarks/$script.py does not load"; status=1; }
  done
  collected=$("$PY" -m pytest -q --collect-only -k on_cuda tests 2>&1)
  grep -q "::test_.*on_cuda" <<< "$collected" || { echo "error: no on_cuda test collected: $collected"; status=1; }
  [ $status = 0 ] && echo "dry run: all steps ready"
  exit $status
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run lists the steps"; exit 2; }
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
echo "logs in $LOGS"
rows=()
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command pattern <<< "$step"
  echo "== $name: $command"
  started=$SECONDS
  timeout "$limit" $command > "$LOGS/$name.log" 2>&1
  rc=$?
  spent=$((SECONDS - started))
  result=$([ $rc = 0 ] && echo ok || { [ $rc = 124 ] && echo "timed out" || echo "failed ($rc)"; })
  summary=$(grep -E "$pattern" "$LOGS/$name.log" | sed 's/^ *//' | paste -sd ';' -)
  rows+=("| $name | $result | ${spent} s | ${summary:-see $LOGS/$name.log} |")
done
echo
echo "| step | result | time | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
