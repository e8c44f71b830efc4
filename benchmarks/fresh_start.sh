#!/usr/bin/env bash
# Time from the README's first command, on a fresh clone with a fresh venv and an empty model cache,
# to the first answered chat request; then the time of a second start (model already converted).
#
#   bash benchmarks/fresh_start.sh            # prints both figures; leaves nothing behind
#
# The README command is run as written (venv, torch, the package, `soar serve`); the script only
# adds the client that polls /health and sends one request.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
port=${PORT:-18321}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
git clone -q "$repo" "$work/soarllm"
export SOARLLM_HOME="$work/home"

ask() {  # wait for the server, then send one chat request; prints seconds since $1
  local t0=$1
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; do sleep 0.2; done
  curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}' >/dev/null
  echo "$(( $(date +%s%N) - t0 ))" | awk '{printf "%.1f", $1 / 1e9}'
}

cd "$work/soarllm"
t0=$(date +%s%N)
( python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 \
  && pip install -q -e . && exec soar serve --port "$port" --no-access-log ) \
  > "$work/first.log" 2>&1 &
first=$(ask "$t0")
kill %1; wait %1 2>/dev/null || true

t1=$(date +%s%N)
( . .venv/bin/activate && exec soar serve --port "$port" --no-access-log ) > "$work/second.log" 2>&1 &
second=$(ask "$t1")
kill %2 2>/dev/null || true

echo "fresh venv + install + pull + convert -> first answered request: ${first} s"
echo "second start (installed, model converted) -> first answered request: ${second} s"
