#!/usr/bin/env bash
# Restart time of `soar serve` on this machine: launch -> /health -> first answered chat request,
# for the default (answer eagerly while the saved compiled step loads in the background) and for
# --load-compiled-first, alternating, RUNS times each. A first start that compiles is run and
# left out (the compiled step is then saved); the model must be pulled (`soar pull`).
#
#   bash benchmarks/restart_time.sh [MODEL]      # RUNS=3 PORT=18331 by default
set -euo pipefail
model=${1:-smollm2-135m-instruct}
port=${PORT:-18331}
runs=${RUNS:-3}
log=$(mktemp)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -f "$log"' EXIT

start() {  # start(label, extra flags...): prints "label health_s answer_s"
  local label=$1; shift
  local t0 pid
  t0=$(date +%s%N)
  soar serve "$model" --port "$port" --no-access-log "$@" > "$log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.02
  done
  local t1; t1=$(date +%s%N)
  curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}' >/dev/null
  local t2; t2=$(date +%s%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v l="$label" -v a="$t0" -v b="$t1" -v c="$t2" \
    'BEGIN { printf "%-22s health %5.2f s   first answer %5.2f s\n", l, (b - a) / 1e9, (c - a) / 1e9 }'
}

start "(compile, left out)" --load-compiled-first > /dev/null
for _ in $(seq "$runs"); do
  start "default"
  start "--load-compiled-first" --load-compiled-first
done
