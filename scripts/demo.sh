#!/usr/bin/env bash
# The demo of the README: generate a labelled demo set, then extract -> align -> train -> score-video -> report.
# Everything lands in ./demo-run, or the folder given as $1 (delete it to start over; rerunning resumes and
# skips finished work).
OUT="$(realpath -m "${1:-demo-run}")"  # before env.sh moves to the repository root: relative to where it is run
. "$(dirname "$0")/env.sh"
set -x
dfpipe demo-data "$OUT/videos"
dfpipe extract "$OUT/videos" --work "$OUT/ws"
dfpipe align --work "$OUT/ws"
dfpipe train --work "$OUT/ws" --run "$OUT/run" --config "$ROOT/scripts/demo.yaml"
dfpipe score-video "$OUT/videos" --checkpoint "$OUT/run/best.pt" --labels "$OUT/ws/manifests/videos.csv" \
  --out "$OUT/scores.csv"
dfpipe report "$OUT/scores.csv" --checkpoint "$OUT/run/best.pt" --out "$OUT/report"  # open $OUT/report/index.html
