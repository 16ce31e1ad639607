#!/usr/bin/env bash
# The GPU readiness check: bash scripts/gpu_check.sh [--dry]   (see scripts/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
