#!/usr/bin/env bash
# Stop the Ray processes that start.sh started on this machine.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
ray_bin="${RAY_BIN:-$(command -v ray || echo "$here/.venv/bin/ray")}"
"$ray_bin" stop --force >&2
