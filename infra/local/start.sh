#!/usr/bin/env bash
# Start a one-machine Ray cluster (head node with the dashboard, so `ray job submit` works) and
# wait until its job server answers. Settings through the environment:
#   RAY_NUM_CPUS (default: all cores)  RAY_NUM_GPUS (default: detected)  RAY_PORT (6379)
#   RAY_DASHBOARD_PORT (8265)  RAY_DASHBOARD_AGENT_LISTEN_PORT (52365)
#   RAY_TEMP_DIR (default: Ray's /tmp/ray; a cluster of its own here is stopped alone by stop.sh)
#   RAY_AUTH_MODE (disabled: use the same value for `ray job submit`)
#   RAY_BIN (default: ray on PATH, else .venv/bin/ray)
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
here="$(cd "$(dirname "$0")/../.." && pwd)"
ray_bin="${RAY_BIN:-$(command -v ray || echo "$here/.venv/bin/ray")}"
# Job drivers inherit the head's PATH: let their `python` be the one that has this project.
export PATH="$(dirname "$ray_bin"):$PATH"
port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
args=(--head --port="$port" --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --disable-usage-stats)
args+=(--dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_LISTEN_PORT:-52365}")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RAY_NUM_GPUS")
"$ray_bin" start "${args[@]}" >&2
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:${dashboard_port}/api/version" >/dev/null; then
    echo "http://127.0.0.1:${dashboard_port}"
    exit 0
  fi
  sleep 1
done
echo "Ray head started but its dashboard (job server) did not answer on port ${dashboard_port}" >&2
exit 1
