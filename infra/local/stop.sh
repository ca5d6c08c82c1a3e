#!/usr/bin/env bash
# Stop the cluster start.sh started. With RAY_TEMP_DIR (the same value as for start.sh) only the
# processes of that cluster are stopped; without it, every Ray process on this machine
# (`ray stop --force`).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
ray_bin="${RAY_BIN:-$(command -v ray || echo "$here/.venv/bin/ray")}"
if [[ -z "${RAY_TEMP_DIR:-}" ]]; then
  "$ray_bin" stop --force >&2
  exit 0
fi

# A process of the cluster names its session directory (under the temp dir) on its command line
# or holds one of its log files open; Ray renames its workers and agents, so both are checked.
# This script and its callers (a Ray driver may hold the cluster's files open) are never stopped.
ancestors=" "
pid=$$
while [[ "$pid" -gt 1 ]]; do
  ancestors+="$pid "
  pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || echo 1)
done

cluster_pids() {
  local proc
  for proc in /proc/[0-9]*; do
    [[ "$ancestors" == *" ${proc#/proc/} "* ]] && continue
    if { tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null | grep -qF -- "$RAY_TEMP_DIR/" ||
       ls -l "$proc/fd" 2>/dev/null | grep -qF -- "$RAY_TEMP_DIR/"; then
      echo "${proc#/proc/}"
    fi
  done
}

pids=$(cluster_pids)
[[ -z "$pids" ]] && exit 0
kill -TERM $pids 2>/dev/null || true
for _ in $(seq 1 20); do
  pids=$(cluster_pids)
  [[ -z "$pids" ]] && exit 0
  sleep 0.5
done
kill -KILL $pids 2>/dev/null || true
