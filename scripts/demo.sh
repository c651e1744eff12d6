#!/usr/bin/env bash
# The demo of the README: generate a labelled demo set, then extract -> align -> train -> score-video.
# Everything lands in ./demo-run (delete it to start over; rerunning resumes and skips finished work).
. "$(dirname "$0")/env.sh"
OUT="${1:-demo-run}"
set -x
dfpipe demo-data "$OUT/videos"
dfpipe extract "$OUT/videos" --work "$OUT/ws"
dfpipe align --work "$OUT/ws"
dfpipe train --work "$OUT/ws" --run "$OUT/run" --config "$ROOT/scripts/demo.yaml"
dfpipe score-video "$OUT/videos" --checkpoint "$OUT/run/best.pt" --labels "$OUT/ws/manifests/videos.csv" \
  --out "$OUT/scores.csv"
