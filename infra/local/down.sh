#!/usr/bin/env bash
# Stop everything infra/local/up.sh started for this work dir (only those processes; other Ray clusters on the
# machine are left alone):
#   infra/local/down.sh            # keep work/local-cluster (logs, MLflow's sqlite db and artifacts)
#   infra/local/down.sh --purge    # and delete it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
exec "${PYTHON:-$root/.venv/bin/python}" -m infra.local.cluster down "$@"
